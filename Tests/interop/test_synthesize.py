"""`ckpt synthesize` (data-free calibration images) and the merge of its shards with `ckpt convert`.

A tiny timm-named ViT (dim 32, 2 blocks, 2 heads, 4-px patches, 16 px input, 5-class head) is written with numpy in
the test, so every run takes a fraction of a second. Checked (formats/synthesis.md is the spec):

1. The output .npz: `images` F32 [N, 3, 16, 16], finite and inside the valid pixel box of the model's normalisation;
   `index` I64 [N]; `synthesis` U8 (settings JSON); `loss_<term>` F32 [N]. noise / smooth run with no steps.
2. Determinism and sharding: `--shard 1/3` equals images 1, 4, … of the full run bit for bit, and the three shards
   merged by `ckpt convert a b c out.npz` equal the full run bit for bit (settings equal but for `shard`, which
   becomes "merged"); the same with a two-stage `--schedule`.
3. `--preview` is a PNG of the contact sheet's size; `--log` has one row per step, and the labels and attention
   losses fall (default α).
4. Errors: flag misuse exits 64 naming the rule; a head of the wrong width, a corrupt model, a schedule size that is
   not a multiple of the patch, and mismatched or overlapping shards exit 2 naming the file; nothing is written.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import run_ckpt, temp_leftovers

DIM, DEPTH, HEADS, PATCH, GRID, CLASSES = 32, 2, 2, 4, 4, 5
SIZE = PATCH * GRID
MEAN = np.array([0.485, 0.456, 0.406])  # timm checkpoints without a config: ImageNet normalisation
STD = np.array([0.229, 0.224, 0.225])
LOSSES = ["loss_labels", "loss_attention", "loss_total_variation", "loss_similarity"]
MODEL_FLAGS = ("--heads", HEADS)


def tiny_vit(seed: int = 3) -> dict[str, np.ndarray]:
    """A random timm-named ViT state dict (pre-norm blocks, fused qkv, class token, learned positions, head)."""
    r = np.random.default_rng(seed)

    def n(*shape, scale=1.0):
        return (r.standard_normal(shape) * scale).astype(np.float32)

    sd = {"cls_token": n(1, 1, DIM, scale=0.5), "pos_embed": n(1, 1 + GRID * GRID, DIM, scale=0.5),
          "patch_embed.proj.weight": n(DIM, 3, PATCH, PATCH, scale=1 / np.sqrt(3 * PATCH * PATCH)),
          "patch_embed.proj.bias": n(DIM, scale=0.1)}
    for b in range(DEPTH):
        p = f"blocks.{b}."
        sd |= {p + "norm1.weight": 1 + n(DIM, scale=0.2), p + "norm1.bias": n(DIM, scale=0.1),
               p + "attn.qkv.weight": n(3 * DIM, DIM, scale=1 / np.sqrt(DIM)), p + "attn.qkv.bias": n(3 * DIM, scale=0.1),
               p + "attn.proj.weight": n(DIM, DIM, scale=1 / np.sqrt(DIM)), p + "attn.proj.bias": n(DIM, scale=0.1),
               p + "norm2.weight": 1 + n(DIM, scale=0.2), p + "norm2.bias": n(DIM, scale=0.1),
               p + "mlp.fc1.weight": n(4 * DIM, DIM, scale=1 / np.sqrt(DIM)), p + "mlp.fc1.bias": n(4 * DIM, scale=0.1),
               p + "mlp.fc2.weight": n(DIM, 4 * DIM, scale=1 / np.sqrt(4 * DIM)), p + "mlp.fc2.bias": n(DIM, scale=0.1)}
    sd |= {"norm.weight": 1 + n(DIM, scale=0.2), "norm.bias": n(DIM, scale=0.1),
           "head.weight": n(CLASSES, DIM, scale=1 / np.sqrt(DIM)), "head.bias": n(CLASSES, scale=0.1)}
    return sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("synth")
    save_file(tiny_vit(), str(d / "tiny.safetensors"), metadata={"format": "pt"})
    r = np.random.default_rng(7)
    save_file({"weight": r.standard_normal((7, DIM)).astype(np.float32), "bias": np.zeros(7, np.float32)}, str(d / "head.safetensors"))
    save_file({"weight": r.standard_normal((7, DIM // 2)).astype(np.float32), "bias": np.zeros(7, np.float32)},
              str(d / "narrow_head.safetensors"))
    return {"model": d / "tiny.safetensors", "head": d / "head.safetensors", "narrow": d / "narrow_head.safetensors"}


def synthesize(tiny, out: Path, *args, check=0):
    return run_ckpt("synthesize", tiny["model"], out, *MODEL_FLAGS, *args, check=check)


def settings(npz) -> dict:
    return json.loads(bytes(npz["synthesis"]).decode())


def assert_in_box(images: np.ndarray) -> None:
    assert np.isfinite(images).all()
    lower = ((0 - MEAN) / STD).astype(np.float32)
    upper = ((1 - MEAN) / STD).astype(np.float32)
    for c in range(3):
        assert images[:, c].min() >= lower[c] and images[:, c].max() <= upper[c], f"channel {c} leaves the pixel box"


def assert_no_output(folder: Path, *paths: Path) -> None:
    assert temp_leftovers(folder) == []
    for p in paths:
        assert not p.exists(), f"{p.name} was written"


# ----------------------------------------------------------------------------------------------------------------
# 1. The file


def test_output_layout_and_pixel_box(tmp_path, tiny):
    out = tmp_path / "s.npz"
    doc = json.loads(synthesize(tiny, out, "--head", tiny["head"], "--images", 3, "--steps", 4, "--json").stdout)
    f = np.load(out)
    assert list(f.keys()) == ["images", "index", "synthesis"] + LOSSES
    assert f["images"].dtype == np.float32 and f["images"].shape == (3, 3, SIZE, SIZE)
    assert f["index"].dtype == np.int64 and f["index"].tolist() == [0, 1, 2]
    assert f["synthesis"].dtype == np.uint8
    for name in LOSSES:
        assert f[name].dtype == np.float32 and f[name].shape == (3,)
        assert np.isfinite(f[name]).all()
    assert (f["loss_labels"] > 0).all() and (f["loss_attention"] > 0).all() and (f["loss_total_variation"] > 0).all()
    assert (f["loss_similarity"] == 0).all()  # spdfq with a head: no PSE
    assert_in_box(f["images"])
    s = settings(f)
    assert s["method"] == "spdfq" and s["steps"] == 4 and s["schedule"] == f"{SIZE}:4" and s["shard"] == "0/1"
    assert s["images"] == 3 and s["image_size"] == SIZE and "seconds" not in s
    assert doc["settings"] == s and doc["n"] == 3
    assert [st["size"] for st in doc["stages"]] == [SIZE] and doc["stages"][0]["image_steps_per_second"] > 0
    assert doc["stages"][0]["mean_final_losses"] == doc["mean_final_losses"]
    assert doc["mean_final_losses"]["labels"] == pytest.approx(float(np.mean(f["loss_labels"].astype(np.float64))), rel=1e-6)


@pytest.mark.parametrize("method", ["noise", "smooth"])
def test_noise_methods_need_no_steps(tmp_path, tiny, method):
    out = tmp_path / f"{method}.npz"
    synthesize(tiny, out, "--method", method, "--images", 4)
    f = np.load(out)
    assert f["images"].shape == (4, 3, SIZE, SIZE)
    assert_in_box(f["images"])
    assert f["images"].std() > 0.1
    s = settings(f)
    assert s["steps"] == 0 and s["schedule"] is None
    for name in LOSSES:
        assert (f[name] == 0).all()


def test_default_schedule_is_half_grid_then_full(tmp_path, tiny):
    out = tmp_path / "d.npz"
    synthesize(tiny, out, "--images", 1, "--method", "psaq")
    s = settings(np.load(out))
    stages = [tuple(map(int, st.split(":"))) for st in s["schedule"].split(",")]
    assert [size for size, _ in stages] == [SIZE // 2, SIZE] and s["steps"] == sum(steps for _, steps in stages)


# ----------------------------------------------------------------------------------------------------------------
# 2. Shards: bit-identical images, and the merge


@pytest.mark.parametrize("plan", [("--steps", 3), ("--schedule", f"{SIZE // 2}:3,{SIZE}:2")], ids=["steps", "schedule"])
def test_shards_equal_full_run_and_merge(tmp_path, tiny, plan):
    args = ("--head", tiny["head"], "--images", 7, *plan)
    full = tmp_path / "full.npz"
    synthesize(tiny, full, *args)
    shards = []
    for k in range(3):
        shards.append(tmp_path / f"shard{k}.npz")
        synthesize(tiny, shards[-1], *args, "--shard", f"{k}/3")
    f = np.load(full)
    one = np.load(shards[1])
    assert one["index"].tolist() == [1, 4]
    assert one["images"].tobytes() == f["images"][1::3].tobytes()
    for name in LOSSES:
        assert one[name].tobytes() == f[name][1::3].tobytes()
    assert settings(one)["shard"] == "1/3"
    merged = tmp_path / "merged.npz"
    proc = run_ckpt("convert", shards[2], shards[0], shards[1], merged)  # any order
    assert "7 images" in proc.stdout
    m = np.load(merged)
    assert list(m.keys()) == list(f.keys())
    for name in ["images", "index"] + LOSSES:
        assert m[name].dtype == f[name].dtype and m[name].shape == f[name].shape
        assert m[name].tobytes() == f[name].tobytes(), name
    ms, fs = settings(m), settings(f)
    assert ms.pop("shard") == "merged" and fs.pop("shard") == "0/1"
    assert ms == fs


def test_schedule_stages_in_json_and_log(tmp_path, tiny):
    out, log = tmp_path / "s.npz", tmp_path / "losses.csv"
    doc = json.loads(synthesize(tiny, out, "--schedule", f"{SIZE // 2}:3,{SIZE}:2", "--images", 2, "--log", log, "--json").stdout)
    assert [(st["size"], st["steps"]) for st in doc["stages"]] == [(SIZE // 2, 3), (SIZE, 2)]
    assert all(st["image_steps_per_second"] > 0 for st in doc["stages"])
    assert np.load(out)["images"].shape == (2, 3, SIZE, SIZE)  # always at the model's size
    rows = list(csv.DictReader(log.open()))
    assert list(rows[0].keys()) == ["step", "size", "labels", "attention", "total_variation", "similarity"]
    assert [int(r["step"]) for r in rows] == list(range(5))
    assert [int(r["size"]) for r in rows] == [SIZE // 2] * 3 + [SIZE] * 2
    # The last row of each stage is the mean of that stage's final losses.
    for st, last in zip(doc["stages"], [rows[2], rows[4]]):
        for term in ["labels", "attention", "total_variation"]:
            assert float(last[term]) == pytest.approx(st["mean_final_losses"][term], rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# 3. Preview and loss curves


def test_preview_png(tmp_path, tiny):
    from PIL import Image

    out, sheet = tmp_path / "s.npz", tmp_path / "sheet.png"
    synthesize(tiny, out, "--method", "smooth", "--images", 5, "--preview", sheet)
    with Image.open(sheet) as im:
        im.load()
        # 5 tiles of 16 px in one row, 2-px borders around and between.
        assert im.size == (5 * SIZE + 6 * 2, SIZE + 2 * 2) and im.mode == "RGB"


def test_spdfq_losses_decrease(tmp_path, tiny):
    out, log = tmp_path / "s.npz", tmp_path / "losses.csv"
    synthesize(tiny, out, "--head", tiny["head"], "--images", 2, "--steps", 30, "--log", log)
    rows = list(csv.DictReader(log.open()))
    assert len(rows) == 30
    labels = np.array([float(r["labels"]) for r in rows])
    attention = np.array([float(r["attention"]) for r in rows])
    assert np.isfinite(labels).all() and np.isfinite(attention).all()
    assert labels[-5:].mean() < labels[:5].mean(), labels
    assert labels[-1] < labels[0], labels
    assert attention[-5:].mean() < attention[:5].mean(), attention
    assert attention[-1] < attention[0], attention


# ----------------------------------------------------------------------------------------------------------------
# 4. Errors


@pytest.mark.parametrize("shard", ["3/2", "1", "2/2", "a/b"])
def test_bad_shard_is_usage_error(tmp_path, tiny, shard):
    out = tmp_path / "s.npz"
    proc = synthesize(tiny, out, "--steps", 1, "--shard", shard, check=64)
    assert "K/N with 0 ≤ K < N" in proc.stderr
    assert_no_output(tmp_path, out)


@pytest.mark.parametrize("args,rule", [
    (("--steps", 2, "--schedule", "8:2"), "exclude each other"),
    (("--schedule", "8:2,16"), "SIZE:STEPS"),
    (("--schedule", "8:0"), "steps"),
    (("--log", "losses.txt"), ".csv"),
])
def test_bad_flags_are_usage_errors(tmp_path, tiny, args, rule):
    out = tmp_path / "s.npz"
    proc = synthesize(tiny, out, *args, check=64)
    assert rule in proc.stderr
    assert_no_output(tmp_path, out)


def test_narrow_head_names_head_file(tmp_path, tiny):
    out, log, sheet = tmp_path / "s.npz", tmp_path / "l.csv", tmp_path / "p.png"
    proc = synthesize(tiny, out, "--head", tiny["narrow"], "--steps", 1, "--log", log, "--preview", sheet, check=2)
    assert "narrow_head.safetensors" in proc.stderr and "width" in proc.stderr
    assert_no_output(tmp_path, out, log, sheet)


def test_schedule_size_off_the_patch_grid(tmp_path, tiny):
    out = tmp_path / "s.npz"
    proc = synthesize(tiny, out, "--schedule", "10:2,16:1", check=2)
    assert "tiny.safetensors" in proc.stderr and "multiple of the model's patch size 4" in proc.stderr
    assert_no_output(tmp_path, out)


def test_corrupt_model(tmp_path, tiny):
    bad = tmp_path / "bad.safetensors"
    blob = tiny["model"].read_bytes()
    bad.write_bytes(blob[: len(blob) // 2])
    out = tmp_path / "s.npz"
    proc = run_ckpt("synthesize", bad, out, *MODEL_FLAGS, "--steps", 1, check=2)
    assert "bad.safetensors" in proc.stderr
    assert_no_output(tmp_path, out)


@pytest.fixture(scope="module")
def shard_pair(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("pair")
    paths = {}
    for name, extra in [("a", ("--shard", "0/2")), ("b", ("--shard", "1/2")), ("seed", ("--shard", "1/2", "--seed", 9)),
                        ("a3", ("--shard", "0/3"))]:
        paths[name] = d / f"{name}.npz"
        synthesize(tiny, paths[name], "--method", "noise", "--images", 6, *extra)
    return paths


def test_merge_refuses_mismatched_settings(tmp_path, shard_pair):
    out = tmp_path / "m.npz"
    proc = run_ckpt("convert", shard_pair["a"], shard_pair["seed"], out, check=2)
    assert "seed.npz" in proc.stderr and "'seed'" in proc.stderr and "but 'shard'" in proc.stderr
    assert_no_output(tmp_path, out)


def test_merge_refuses_overlapping_indices(tmp_path, shard_pair):
    out = tmp_path / "m.npz"
    proc = run_ckpt("convert", shard_pair["a"], shard_pair["a3"], out, check=2)  # image 0 is in both
    assert "a3.npz" in proc.stderr and "disjoint" in proc.stderr
    assert_no_output(tmp_path, out)


def test_merge_of_other_files_is_usage_error(tmp_path, tiny, shard_pair):
    out = tmp_path / "m.npz"
    other = tmp_path / "other.npz"
    np.savez(other, images=np.zeros((1, 3, SIZE, SIZE), np.float32))
    proc = run_ckpt("convert", shard_pair["a"], other, out, check=64)
    assert "other.npz" in proc.stderr and "synthesize" in proc.stderr
    proc = run_ckpt("convert", tiny["model"], tiny["head"], tmp_path / "m.safetensors", check=64)
    assert "synthesize" in proc.stderr
    proc = run_ckpt("convert", shard_pair["a"], shard_pair["b"], out, "--dtype", "F16", check=64)
    assert "--dtype" in proc.stderr
    assert_no_output(tmp_path, out, tmp_path / "m.safetensors")


def test_single_input_convert_unchanged(tmp_path, shard_pair):
    out = tmp_path / "copy.npz"
    run_ckpt("convert", shard_pair["a"], out)
    a, c = np.load(shard_pair["a"]), np.load(out)
    assert list(c.keys()) == list(a.keys())
    for k in a.keys():
        assert c[k].tobytes() == a[k].tobytes()
