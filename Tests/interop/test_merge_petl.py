"""`ckpt merge` with the non-PEFT adapters: SSF (in BASE or in --ssf FILE), FacT-TT / FacT-TK (--fact FILE
--fact-scale S), BitFit (--bitfit FILE, timm or HF q/k/v names) and the non-mergeable tensors (VPT, NOAH prompts and
prefix, Convpass, AdaptFormer): refusal with [notMergeable], or pass-through with --keep-unmerged.

Fixtures: fixtures/adapters/generate_petl.py. The tiny set is committed (fixtures/adapters/petl/tiny); the DINOv2
ViT-S/14 set lives in .cache/adapters/petl (tests skip when it is missing). Each set's cases.json lists the cases;
goldens are float64-numpy merges rounded to F32; outputs.npz holds the adapted torch models' outputs (float64 eval).

Checks per mergeable case: exit 0; output names = golden names (ssf_* gone, created biases present, head added or
replaced); base order kept; untouched tensors bit-identical to the base; replacement tensors bit-identical to the
adapter's; merged tensors within relative L2 1e-6 of the golden; and the plain timm-named ViT loaded with the output
reproduces the adapted model's outputs (max abs 1e-5).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import REPO, read_safetensors_raw, rel_l2, run_ckpt, temp_leftovers

TINY = REPO / "fixtures" / "adapters" / "petl" / "tiny"
REAL = REPO / ".cache" / "adapters" / "petl"
REL_L2 = 1e-6

sys.path.insert(0, str(REPO / "fixtures" / "adapters"))


def _meta(folder: Path) -> dict:
    return json.loads((folder / "cases.json").read_text())


def _sets():
    out = [pytest.param(TINY, id="tiny")]
    out.append(pytest.param(REAL, id="dinov2", marks=pytest.mark.skipif(
        not (REAL / "cases.json").is_file(),
        reason=f"{REAL} missing: run `.venv/bin/python fixtures/adapters/generate_petl.py --real`")))
    return out


def _cases():
    params = []
    for s in _sets():
        folder = s.values[0]
        names = sorted(_meta(folder)["cases"]) if (folder / "cases.json").is_file() else \
            ["ssf_in_base", "ssf_in_file", "fact_tt", "fact_tk", "bitfit"]
        for name in names:
            params.append(pytest.param(folder, name, id=f"{s.id}-{name}", marks=s.marks))
    return params


def _args(folder: Path, case: dict, out: Path, *extra):
    flags = [str(folder / f) if f.endswith(".safetensors") else f for f in case["flags"]]
    return ["merge", folder / case["base"], out, *flags, *extra]


def _offset_order(path: Path) -> list[str]:
    _, header, _ = read_safetensors_raw(path)
    return [k for k, _ in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])]


def _dtypes(path: Path) -> dict[str, str]:
    _, header, _ = read_safetensors_raw(path)
    return {k: v["dtype"] for k, v in header.items()}


def _assert_refused(proc, out: Path, folder: Path, names, *, any_of=False):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert err.endswith("[notMergeable]"), f"stderr does not end with [notMergeable]: {err!r}"
    found = [n for n in names if n in err]
    if any_of:
        assert found, f"stderr names none of {names}: {err!r}"
    elif found != list(names):
        # a long list may be abbreviated, but then the message must name some and give the total count
        assert found and str(len(names)) in err, (
            f"stderr misses {sorted(set(names) - set(found))} and gives no count of {len(names)}: {err!r}")
    assert not out.exists(), f"{out} was written"
    assert temp_leftovers(folder) == []


# ------------------------------------------------------------------------------------------------------------------
# functional check: the merged checkpoint in the plain timm-named ViT reproduces the adapted model


def _run_plain(meta: dict, sd: dict[str, np.ndarray], inputs: np.ndarray):
    import torch
    from vit_timm import VisionTransformer

    torch.set_num_threads(1)
    m = meta["model"]
    num_classes = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
    with torch.device("meta"):  # no random init of 22 M parameters; the state dict is assigned below
        model = VisionTransformer(dim=m["dim"], depth=m["depth"], heads=m["heads"], patch=m["patch"],
                                  grid=m["grid"], mlp_ratio=m["mlp_ratio"], layer_scale=m["layer_scale"],
                                  eps=m["eps"], num_classes=num_classes)
    model.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in sd.items()}, strict=True,
                          assign=True)
    model = model.eval()
    with torch.no_grad():
        feats = model.features(torch.from_numpy(inputs.astype(np.float64)))
        logits = model.head(feats) if num_classes else None
    return (None if logits is None else logits.numpy()), feats.numpy()


def _assert_reproduces(meta: dict, folder: Path, key: str, sd: dict[str, np.ndarray]):
    ref = np.load(folder / "outputs.npz")
    logits, feats = _run_plain(meta, sd, ref["inputs"])
    tol = meta["output_tolerance"]
    d = float(np.max(np.abs(feats - ref[f"{key}_features"])))
    assert d <= tol, f"features differ from the adapted model by {d:.3e} > {tol}"
    if f"{key}_logits" in ref.files:
        assert logits is not None, "the adapted model has a head, the merged checkpoint has none"
        d = float(np.max(np.abs(logits - ref[f"{key}_logits"])))
        assert d <= tol, f"logits differ from the adapted model by {d:.3e} > {tol}"
    # the adapter really changes the model (guards against a merge that silently does nothing)
    moved = float(np.max(np.abs(feats - ref["base_features"])))
    if key != "base":
        assert moved > 1e-3, f"merged model is indistinguishable from the base ({moved:.2e})"


# ------------------------------------------------------------------------------------------------------------------
# mergeable cases


def _check_output(folder: Path, meta: dict, name: str, out: Path, *, extra_golden=None):
    case = meta["cases"][name]
    golden = load_file(str(folder / case["golden"]))
    if extra_golden:
        golden.update(extra_golden)
    base_path = folder / case["base"]
    base = load_file(str(base_path))
    got = load_file(str(out))

    assert sorted(got) == sorted(golden), (
        f"names differ: missing {sorted(set(golden) - set(got))}, unexpected {sorted(set(got) - set(golden))}")
    assert not [k for k in got if "ssf_scale" in k or "ssf_shift" in k], "ssf_* tensors left in the output"
    for k in case["created"]:
        assert k in got and k not in base, f"created bias {k} missing"
    assert set(_dtypes(out).values()) == {"F32"}, _dtypes(out)

    # base tensors keep their relative order
    order = [k for k in _offset_order(out) if k in base]
    want = [k for k in _offset_order(base_path) if k in got]
    assert order == want, "base tensor order not kept"

    adapter_files = [folder / f for f in case["flags"] if f.endswith(".safetensors")]
    adapter = {}
    for f in adapter_files:
        adapter.update(load_file(str(f)))
    changed = set(case["changed"]) | set(case["created"])
    for k, g in golden.items():
        assert got[k].shape == g.shape, f"{k}: shape {got[k].shape} != {g.shape}"
        if k in case["replaced"]:  # replacement (head, BitFit bias, HF q/k/v rows): exact copies
            if k in adapter:
                assert got[k].tobytes() == adapter[k].tobytes(), f"{k}: not the adapter's tensor"
            assert got[k].tobytes() == g.tobytes(), (
                f"{k}: a replacement must copy the adapter's values exactly (not base + (ft - base) in F32); "
                f"{int(np.sum(got[k] != g))} of {g.size} elements differ, max |diff| "
                f"{float(np.max(np.abs(got[k].astype(np.float64) - g))):.3e}")
        elif k in changed:
            r = rel_l2(got[k], g)
            assert r <= REL_L2, f"{k}: relative L2 {r:.3e} > {REL_L2}"
        else:
            assert got[k].tobytes() == (base[k] if k in base else g).tobytes(), f"{k}: untouched tensor changed"
    return got


@pytest.mark.parametrize("folder,name", _cases())
def test_merge_matches_golden_and_adapted_model(tmp_path, folder, name):
    meta = _meta(folder)
    case = meta["cases"][name]
    out = tmp_path / "merged.safetensors"
    run_ckpt(*_args(folder, case, out), timeout=120)
    assert temp_leftovers(tmp_path) == []
    got = _check_output(folder, meta, name, out)
    _assert_reproduces(meta, folder, case["outputs"], got)


@pytest.mark.parametrize("folder", _sets())
def test_ssf_in_base_and_in_file_agree(tmp_path, folder):
    meta = _meta(folder)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run_ckpt(*_args(folder, meta["cases"]["ssf_in_base"], a), timeout=120)
    run_ckpt(*_args(folder, meta["cases"]["ssf_in_file"], b), timeout=120)
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].tobytes() == tb[k].tobytes(), f"{k}: SSF in BASE and in --ssf FILE differ"


def test_ssf_fold_targets_are_the_official_insertion_points():
    """Which tensors an SSF fold touches: patch conv, norm1/norm2, qkv/proj, fc1/fc2, final norm; nothing else."""
    meta = _meta(TINY)
    depth = meta["model"]["depth"]
    want = {"patch_embed.proj", "norm"}
    for i in range(depth):
        want |= {f"blocks.{i}.{m}" for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    changed = {k.rsplit(".", 1)[0] for k in meta["cases"]["ssf_in_base"]["changed"]}
    assert changed == want
    for k in ("cls_token", "pos_embed", "blocks.0.ls1.gamma", "blocks.0.ls2.gamma"):
        assert k not in meta["cases"]["ssf_in_base"]["changed"]


def test_fact_variants_touch_only_attn_and_mlp_weights():
    meta = _meta(TINY)
    for name in ("fact_tt", "fact_tk"):
        changed = set(meta["cases"][name]["changed"])
        assert changed == {f"blocks.{i}.{m}.weight" for i in range(meta["model"]["depth"])
                           for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}, name
        assert meta["cases"][name]["replaced"] == ["head.bias", "head.weight"]
    assert "FacTc" in load_file(str(TINY / "fact_tk.safetensors"))
    assert "FacTc" not in load_file(str(TINY / "fact_tt.safetensors"))


def test_fact_scale_matters(tmp_path):
    """A different --fact-scale gives a different (wrong) merge: the scale is not in the file."""
    meta = _meta(TINY)
    case = dict(meta["cases"]["fact_tt"])
    case["flags"] = [f if f != repr(meta["fact"]["fact_tt"]["scale"]) else "1.0" for f in case["flags"]]
    out = tmp_path / "m.safetensors"
    run_ckpt(*_args(TINY, case, out))
    got = load_file(str(out))
    golden = load_file(str(TINY / case["golden"]))
    assert rel_l2(got["blocks.0.attn.qkv.weight"], golden["blocks.0.attn.qkv.weight"]) > 1e-3


def test_bitfit_hf_names_replace_qkv_rows(tmp_path):
    """HF q/k/v bias names land in rows [0:D], [D:2D], [2D:3D] of the fused timm qkv.bias; rows with no HF tensor
    (block 1 key) keep the base values bit for bit."""
    meta = _meta(TINY)
    case = meta["cases"]["bitfit_hf_names"]
    out = tmp_path / "m.safetensors"
    run_ckpt(*_args(TINY, case, out))
    got, base = load_file(str(out)), load_file(str(TINY / case["base"]))
    hf = load_file(str(TINY / "bitfit_hf_names.safetensors"))
    d = meta["model"]["dim"]
    for i in range(meta["model"]["depth"]):
        b = got[f"blocks.{i}.attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            src = hf.get(f"encoder.layer.{i}.attention.attention.{n}.bias")
            want = src if src is not None else base[f"blocks.{i}.attn.qkv.bias"][j * d:(j + 1) * d]
            assert b[j * d:(j + 1) * d].tobytes() == want.tobytes(), (i, n)


def test_merge_f16_output(tmp_path):
    meta = _meta(TINY)
    case = meta["cases"]["ssf_in_file"]
    out = tmp_path / "m16.safetensors"
    run_ckpt(*_args(TINY, case, out, "--dtype", "F16"))
    assert set(_dtypes(out).values()) == {"F16"}
    got = load_file(str(out))
    golden = load_file(str(TINY / case["golden"]))
    base = load_file(str(TINY / case["base"]))
    assert sorted(got) == sorted(golden)
    for k, g in golden.items():
        if k in case["changed"] or k in case["replaced"]:
            assert rel_l2(got[k], g) <= 1e-3, k
        else:  # untouched: one RNE rounding of the base value
            assert got[k].tobytes() == base[k].astype(np.float16).tobytes(), k


def test_dry_run_writes_nothing_and_json_plan(tmp_path):
    meta = _meta(TINY)
    case = meta["cases"]["ssf_in_file"]
    out = tmp_path / "m.safetensors"
    proc = run_ckpt(*_args(TINY, case, out, "--dry-run", "--json"))
    assert not out.exists()
    assert temp_leftovers(tmp_path) == []
    doc = json.loads(proc.stdout)
    plan = doc["plan"]
    assert isinstance(plan, list) and plan
    for entry in plan:
        assert isinstance(entry.get("target"), str) and isinstance(entry.get("rule"), str), entry
    targets = {e["target"] for e in plan}
    for k in set(case["changed"]) | set(case["replaced"]):
        assert any(k == t or k.startswith(t + ".") for t in targets), f"plan has no entry for {k}"


# ------------------------------------------------------------------------------------------------------------------
# SSF refusals


@pytest.mark.parametrize("name", sorted(_meta(TINY)["refusals"]))
def test_ssf_not_foldable_is_refused(tmp_path, name):
    r = _meta(TINY)["refusals"][name]
    out = tmp_path / "m.safetensors"
    proc = run_ckpt(*_args(TINY, r, out), check=None)
    _assert_refused(proc, out, tmp_path, r["names_any"], any_of=True)


# ------------------------------------------------------------------------------------------------------------------
# non-mergeable tensors

NONMERGEABLE = ["vpt", "noah_vpt", "prefix", "convpass", "adaptformer"]


def _combined(tmp_path: Path, base_file: str, sample: str) -> tuple[Path, dict, dict]:
    base = load_file(str(TINY / base_file))
    extra = load_file(str(TINY / _meta(TINY)["nonmergeable"][sample]["file"]))
    path = tmp_path / f"{Path(base_file).stem}+{sample}.safetensors"
    save_file({**base, **extra}, str(path), metadata={"format": "pt"})
    return path, base, extra


@pytest.mark.parametrize("sample", NONMERGEABLE)
def test_nonmergeable_in_base_refused(tmp_path, sample):
    full, _, extra = _combined(tmp_path, "base.safetensors", sample)
    before = full.read_bytes()
    out = tmp_path / "m.safetensors"
    proc = run_ckpt("merge", full, out, check=None)
    _assert_refused(proc, out, tmp_path, sorted(extra))
    assert full.read_bytes() == before


@pytest.mark.parametrize("sample", NONMERGEABLE)
def test_nonmergeable_in_base_kept(tmp_path, sample):
    full, base, extra = _combined(tmp_path, "base.safetensors", sample)
    out = tmp_path / "m.safetensors"
    run_ckpt("merge", full, out, "--keep-unmerged")
    got = load_file(str(out))
    assert sorted(got) == sorted({**base, **extra})
    for k, v in {**base, **extra}.items():
        assert got[k].tobytes() == v.tobytes() and got[k].shape == v.shape, k


@pytest.mark.parametrize("sample", ["vpt", "convpass"])
def test_nonmergeable_with_ssf_in_base_kept(tmp_path, sample):
    """SSF folded, the extra (prompt / adapter) tensors passed through unchanged."""
    meta = _meta(TINY)
    full, _, extra = _combined(tmp_path, "ssf_full.safetensors", sample)
    out = tmp_path / "m.safetensors"
    proc = run_ckpt("merge", full, out, check=None)
    _assert_refused(proc, out, tmp_path, sorted(extra))
    run_ckpt("merge", full, out, "--keep-unmerged")
    got = load_file(str(out))
    golden = load_file(str(TINY / meta["cases"]["ssf_in_base"]["golden"]))
    assert sorted(got) == sorted({**golden, **extra})
    for k, v in extra.items():
        assert got[k].tobytes() == v.tobytes(), k
    for k, g in golden.items():
        assert rel_l2(got[k], g) <= REL_L2, k
    _assert_reproduces(meta, TINY, "ssf", {k: v for k, v in got.items() if k not in extra})


def test_nonmergeable_in_adapter_file_refused_then_kept(tmp_path):
    """VPT 'prompt+bias': BitFit biases and prompts in one adapter file."""
    meta = _meta(TINY)
    nm = meta["nonmergeable"]["vpt_bias"]
    out = tmp_path / "m.safetensors"
    args = ["merge", TINY / "base.safetensors", out, nm["flag"], TINY / nm["file"]]
    proc = run_ckpt(*args, check=None)
    _assert_refused(proc, out, tmp_path, nm["tensors"])
    run_ckpt(*args, "--keep-unmerged")
    got = load_file(str(out))
    golden = load_file(str(TINY / nm["mergeable_golden"]))
    extra = {k: v for k, v in load_file(str(TINY / nm["file"])).items() if k in nm["tensors"]}
    assert sorted(got) == sorted({**golden, **extra})
    for k, v in {**golden, **extra}.items():
        assert got[k].tobytes() == v.tobytes(), k
    _assert_reproduces(meta, TINY, "bitfit", golden)


@pytest.mark.parametrize("sample", ["adaptformer", "prefix"])
def test_nonmergeable_in_ssf_file_refused(tmp_path, sample):
    params = load_file(str(TINY / "ssf_params.safetensors"))
    extra = load_file(str(TINY / f"{sample}.safetensors"))
    f = tmp_path / "ssf_plus.safetensors"
    save_file({**params, **extra}, str(f), metadata={"format": "pt"})
    out = tmp_path / "m.safetensors"
    proc = run_ckpt("merge", TINY / "base.safetensors", out, "--ssf", f, check=None)
    _assert_refused(proc, out, tmp_path, sorted(extra))


# ------------------------------------------------------------------------------------------------------------------
# usage errors


@pytest.mark.parametrize("flags", [
    ["--fact", "fact_tt.safetensors"],                       # FacT needs its scale (not stored in the file)
    ["--fact-scale", "2.0"],                                 # a scale with no FacT file
    ["--fact", "fact_tt.safetensors", "--fact-scale", "abc"],
], ids=["fact-without-scale", "scale-without-fact", "scale-not-a-number"])
def test_fact_usage_errors(tmp_path, flags):
    out = tmp_path / "m.safetensors"
    args = [str(TINY / f) if f.endswith(".safetensors") else f for f in flags]
    proc = run_ckpt("merge", TINY / "base.safetensors", out, *args, check=None)
    assert proc.returncode == 64, (proc.returncode, proc.stderr)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------------------
# fixture integrity (no ckpt needed beyond the conftest check)


def test_tiny_fixture_self_check_recorded():
    meta = _meta(TINY)
    for key, c in meta["self_check"].items():
        assert c["max_abs_diff_merged_vs_adapted"] <= meta["output_tolerance"], key
        assert c["max_abs_features_change_vs_base"] > 1e-2, key
    total = sum(p.stat().st_size for p in TINY.iterdir())
    assert total < 2 * 1024 * 1024, total
