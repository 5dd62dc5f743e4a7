"""`ckpt merge` against the real PEFT library (LoRA, rsLoRA + patterns, DoRA, lora_bias/bias="all",
Embedding LoRA, Conv1D fan_in_fan_out, conv LoRA, modules_to_save, several adapters, cross-naming).

Goldens come from PEFT's own merge_and_unload() (fixtures/adapters/generate_peft.py):
* tiny set: fixtures/adapters/peft/tiny/ (committed; cases.json describes each case);
* real set: .cache/adapters/peft/ (DINOv2 ViT-S/14 and all-MiniLM-L6-v2; made by
  `.venv/bin/python fixtures/adapters/generate_peft.py --real`). Those tests skip when it is missing.

For every merge: the output's tensor names are the base's (same data order) plus any new tensors appended;
every tensor the adapter changes is within relative L2 1e-6 of PEFT's merged tensor; every other tensor is
bit-identical to the base; loading the output into the plain (un-adapted) model reproduces the adapted
model's outputs.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import REPO, raw_tensor, read_safetensors_raw, rel_l2, run_ckpt, temp_leftovers

sys.path.insert(0, str(REPO / "fixtures" / "adapters"))
import generate_peft as G  # noqa: E402  (no side effects on import)

TINY = REPO / "fixtures" / "adapters" / "peft" / "tiny"
REAL = REPO / ".cache" / "adapters" / "peft"
TINY_CASES = json.loads((TINY / "cases.json").read_text())
REAL_CASES = json.loads((REAL / "cases.json").read_text()) if (REAL / "cases.json").exists() else {}
REAL_SKIP = pytest.mark.skipif(
    not REAL_CASES,
    reason=f"{REAL}/cases.json missing: run `.venv/bin/python fixtures/adapters/generate_peft.py --real` first",
)

REL_L2 = 1e-6
FORWARD_REL = 1e-5  # max |forward(ckpt output) - adapted forward| <= FORWARD_REL * max |adapted forward|
MERGE_TIMEOUT = 180

MERGE_CASES = sorted(n for n, c in TINY_CASES.items() if "golden" in c)
REFUSAL_CASES = sorted(n for n, c in TINY_CASES.items() if "refuse" in c)
PLAN_CASES = sorted(n for n, c in TINY_CASES.items() if c.get("plan"))


# ---------------------------------------------------------------------------------------------
# helpers

def lora_args(root: Path, adapters) -> list[str]:
    args = []
    for rel, weight in adapters:
        spec = str(root / rel) if weight == 1.0 else f"{root / rel}:{weight}"
        args += ["--lora", spec]
    return args


def merge(root: Path, case: dict, out: Path, *extra, check: int | None = 0, base: Path | None = None):
    base = base or (root / case["base"])
    return run_ckpt("merge", base, out, *lora_args(root, case["adapters"]), *extra, check=check, timeout=MERGE_TIMEOUT)


def data_order(path: Path) -> list[str]:
    """Tensor names in the order of their data in a safetensors file."""
    _, header, _ = read_safetensors_raw(path)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def match_new_tensors(extra_out: set[str], extra_golden: set[str]) -> dict[str, str]:
    """Maps each new golden tensor (absent from the base) to the output tensor holding it: the same name, or the
    same name under a prefix (e.g. a head merged into a `backbone.`-prefixed base)."""
    mapping = {}
    for g in sorted(extra_golden):
        cands = [o for o in extra_out if o == g or o.endswith("." + g)]
        assert len(cands) == 1, f"new tensor {g}: candidates in the output {cands} (all new: {sorted(extra_out)})"
        mapping[g] = cands[0]
    assert set(mapping.values()) == extra_out, f"unexpected new tensors {sorted(extra_out - set(mapping.values()))}"
    return mapping


def check_merged(out: Path, golden: dict[str, np.ndarray], base_path: Path) -> dict[str, np.ndarray]:
    """Checks `out` against PEFT's golden; returns the output tensors (renamed to golden names)."""
    got = load_file(str(out))
    base = load_file(str(base_path))
    assert set(base) <= set(got), f"base tensors missing from the output: {sorted(set(base) - set(got))[:10]}"
    extra_golden = set(golden) - set(base)
    mapping = match_new_tensors(set(got) - set(base), extra_golden)
    assert set(base) <= set(golden), f"golden lacks base tensors {sorted(set(base) - set(golden))[:10]}"
    # order: the base's tensors keep their relative data order. (ckpt's safetensors writer lays tensors out like
    # safetensors.numpy.save_file, which every base here was written with, so new tensors such as a
    # modules_to_save head land at their sorted place rather than at the end.)
    base_set = set(base)
    order = [k for k in data_order(out) if k in base_set]
    assert order == data_order(base_path), "output does not keep the base's tensor order"
    changed = 0
    for name in base:
        b, o, w = base[name], got[name], golden[name]
        assert o.dtype == b.dtype, f"{name}: dtype {o.dtype}, base {b.dtype}"
        assert o.shape == b.shape, f"{name}: shape {o.shape}, base {b.shape}"
        if w.dtype == b.dtype and w.tobytes() == b.tobytes():
            assert o.tobytes() == b.tobytes(), f"{name}: untouched by the adapter but not bit-identical to the base"
        else:
            changed += 1
            err = rel_l2(o, w)
            assert err <= REL_L2, f"{name}: relative L2 error {err:.3g} > {REL_L2}"
    assert changed > 0, "the golden changes no base tensor"
    for g, o in mapping.items():
        err = rel_l2(got[o], golden[g])
        assert got[o].shape == golden[g].shape and err <= REL_L2, f"new tensor {o}: rel L2 {err:.3g}"
    return {**{k: got[k] for k in base}, **{g: got[o] for g, o in mapping.items()}}


def check_forward(kind: str, kwargs: dict, tensors: dict, outputs_npz: Path, *, rename: str | None = None,
                  compare: dict | None = None) -> float:
    """Loads `tensors` into the plain model and compares its outputs with the stored adapted outputs."""
    import torch

    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items() if v.dtype.kind == "f"}
    if rename == "dinov2_v4_backbone":
        sd = G.dinov2_v4_to_v5(sd, "backbone.")
    model = G.build_model(kind, kwargs)
    res = model.load_state_dict(sd, strict=False)
    assert set(res.missing_keys) <= {"embeddings.mask_token"}, f"missing {res.missing_keys}"
    assert all(k.endswith(("head.weight", "head.bias")) for k in res.unexpected_keys), res.unexpected_keys
    if "embeddings.mask_token" in res.missing_keys:
        with torch.no_grad():
            model.embeddings.mask_token.zero_()  # unused at inference
    ref = np.load(outputs_npz)
    inputs = torch.from_numpy(ref["inputs"])
    got = {k: v.numpy() for k, v in G.run_forward(kind, model, inputs).items()}
    compare = compare or {k: k for k in got if k in ref.files}
    assert compare, f"no comparable outputs: model {sorted(got)}, stored {ref.files}"
    worst = 0.0
    for mk, rk in compare.items():
        want = ref[rk]
        scale = float(np.abs(want).max())
        err = float(np.abs(got[mk] - want).max())
        assert err <= FORWARD_REL * scale, f"forward {mk} vs adapted {rk}: max|diff| {err:.3g} (scale {scale:.3g})"
        worst = max(worst, err / scale)
    return worst


def tiny_golden(case: dict) -> dict[str, np.ndarray]:
    return load_file(str(TINY / case["golden"]))


# ---------------------------------------------------------------------------------------------
# tiny set: merges against PEFT goldens + forward reproduction

@pytest.mark.parametrize("name", MERGE_CASES)
def test_tiny_merge_matches_peft(name, tmp_path):
    case = TINY_CASES[name]
    out = tmp_path / "merged.safetensors"
    merge(TINY, case, out)
    got = check_merged(out, tiny_golden(case), TINY / case["base"])
    check_forward(case["model"], case["model_kwargs"], got, TINY / case["outputs"], rename=case.get("rename"),
                  compare=case.get("compare"))
    assert temp_leftovers(tmp_path) == []


def test_tiny_replaced_head_is_the_trained_copy(tmp_path):
    """modules_to_save: the head is replaced by the adapter's trained copy, bit for bit."""
    case = TINY_CASES["lora_basic"]
    out = tmp_path / "m.safetensors"
    merge(TINY, case, out)
    got = load_file(str(out))
    adapter = load_file(str(TINY / "lora_basic" / "adapter_model.safetensors"))
    for leaf in ("weight", "bias"):
        assert got[f"head.{leaf}"].tobytes() == adapter[f"base_model.model.head.{leaf}"].tobytes()


def test_tiny_multi_weights_order_independent(tmp_path):
    """W + 0.7*dA - 0.3*dB does not depend on the order of --lora options."""
    case = TINY_CASES["multi"]
    out1, out2 = tmp_path / "ab.safetensors", tmp_path / "ba.safetensors"
    merge(TINY, case, out1)
    merge(TINY, dict(case, adapters=list(reversed(case["adapters"]))), out2)
    a, b = load_file(str(out1)), load_file(str(out2))
    golden = tiny_golden(case)
    assert set(a) == set(b) == set(golden)
    for k in a:
        assert rel_l2(a[k], golden[k]) <= REL_L2 and rel_l2(b[k], golden[k]) <= REL_L2, k


def test_tiny_weight_zero_is_identity(tmp_path):
    """--lora DIR:0 changes no LoRA target (a replacement tensor such as the head may still be copied)."""
    case = dict(TINY_CASES["rslora_patterns"], adapters=[["rslora_patterns", 0.0]])
    out = tmp_path / "z.safetensors"
    merge(TINY, case, out)
    got, base = load_file(str(out)), load_file(str(TINY / "base.safetensors"))
    for k in base:
        assert np.array_equal(got[k], base[k]), k


@pytest.mark.parametrize("fmt", ["npz"])
def test_tiny_merge_npz_in_out(fmt, tmp_path):
    """BASE and OUT as .npz: same numbers as the safetensors route."""
    case = TINY_CASES["lora_basic"]
    base = load_file(str(TINY / case["base"]))
    base_npz = tmp_path / "base.npz"
    np.savez(base_npz, **base)
    out = tmp_path / "out.npz"
    merge(TINY, case, out, base=base_npz)
    got = dict(np.load(out))
    golden = tiny_golden(case)
    assert set(got) == set(golden)
    for k, w in golden.items():
        if w.tobytes() == base[k].tobytes():
            assert got[k].tobytes() == base[k].tobytes(), k
        else:
            assert rel_l2(got[k], w) <= REL_L2, k


# ---------------------------------------------------------------------------------------------
# --dtype: the merged value is rounded once to the output dtype

def _ordered(bits: np.ndarray) -> np.ndarray:
    """16-bit float bit patterns -> integers whose difference counts ulps (sign-magnitude to two's complement)."""
    b = bits.astype(np.int32)
    mag = b & 0x7FFF
    return np.where(b & 0x8000, -mag, mag)


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_tiny_dtype_rounds_once(dtype, tmp_path):
    case = TINY_CASES["lora_basic"]
    out = tmp_path / f"m_{dtype}.safetensors"
    merge(TINY, case, out, "--dtype", dtype)
    golden = tiny_golden(case)
    base = load_file(str(TINY / case["base"]))
    np_t = np.float16 if dtype == "F16" else ml_dtypes.bfloat16
    _, header, _ = read_safetensors_raw(out)
    assert set(header) == set(golden)
    for name, w in golden.items():
        assert header[name]["dtype"] == dtype, f"{name}: {header[name]['dtype']}"
        got_bits = raw_tensor(out, name, np.uint16).reshape(w.shape)
        want_bits = w.astype(np_t).view(np.uint16)
        if w.tobytes() == base[name].tobytes():  # untouched: exactly the base rounded once
            assert np.array_equal(got_bits, want_bits), f"{name}: untouched tensor not rounded once"
        else:
            ulps = int(np.abs(_ordered(got_bits) - _ordered(want_bits)).max())
            assert ulps <= 1, f"{name}: {ulps} ulps from the golden rounded to {dtype}"


# ---------------------------------------------------------------------------------------------
# --dry-run / --json plan

def _plan(stdout: str) -> list[dict]:
    doc = json.loads(stdout)
    assert isinstance(doc, dict) and isinstance(doc.get("plan"), list), f"no plan list in {stdout[:500]}"
    return doc["plan"]


def _check_plan(plan: list[dict], expected: list[dict]) -> None:
    for want in expected:
        hits = [p for p in plan if p.get("target") == want["target"] and p.get("rule") in ("lora", "dora")]
        assert len(hits) == 1, f"{want['target']}: plan entries {hits} (plan targets {[p.get('target') for p in plan]})"
        got = hits[0]
        assert got["rule"] == want["rule"], f"{want['target']}: rule {got['rule']} != {want['rule']}"
        assert int(got["rank"]) == want["rank"], f"{want['target']}: rank {got['rank']} != {want['rank']}"
        assert got["scaling"] == pytest.approx(want["scaling"], rel=1e-6), f"{want['target']}: scaling"


@pytest.mark.parametrize("name", PLAN_CASES)
def test_tiny_dry_run_json_plan(name, tmp_path):
    case = TINY_CASES[name]
    out = tmp_path / "never.safetensors"
    proc = merge(TINY, case, out, "--dry-run", "--json")
    assert not out.exists(), "--dry-run wrote the output"
    assert list(tmp_path.iterdir()) == [], f"--dry-run left files: {list(tmp_path.iterdir())}"
    _check_plan(_plan(proc.stdout), case["plan"])


def test_tiny_plan_scaling_rules():
    """The recorded PEFT plan itself: alpha/r, alpha/sqrt(r) with rsLoRA, pattern-resolved ranks and alphas."""
    plan = {p["target"]: p for p in TINY_CASES["rslora_patterns"]["plan"]}
    for p in plan.values():
        assert p["scaling"] == pytest.approx(p["alpha"] / np.sqrt(p["rank"]))
    assert plan["blocks.0.attn.qkv.weight"]["rank"] == 8  # '^blocks\.0\.attn\.qkv' in rank_pattern
    assert plan["blocks.1.attn.qkv.weight"]["rank"] == 4
    assert plan["blocks.1.attn.qkv.weight"]["alpha"] == 16  # '^blocks\.1\.attn\.qkv' in alpha_pattern
    assert plan["blocks.0.mlp.fc2.weight"]["rank"] == 2  # suffix 'fc2'
    assert plan["blocks.0.attn.proj.weight"]["alpha"] == 3  # suffix 'attn.proj' ...
    assert plan["patch_embed.proj.weight"]["alpha"] == 8  # ... does not catch patch_embed.proj
    for p in TINY_CASES["lora_basic"]["plan"]:
        assert p["scaling"] == pytest.approx(p["alpha"] / p["rank"])


def test_tiny_plan_lists_replaced_head(tmp_path):
    case = TINY_CASES["lora_basic"]
    proc = merge(TINY, case, tmp_path / "x.safetensors", "--dry-run", "--json")
    plan = _plan(proc.stdout)
    for t in ("head.weight", "head.bias"):
        rules = [p.get("rule") for p in plan if p.get("target") == t]
        assert rules == ["replace"], f"{t}: {rules}"


def test_tiny_dora_plan_rule(tmp_path):
    proc = merge(TINY, TINY_CASES["dora"], tmp_path / "x.safetensors", "--dry-run", "--json")
    rules = {p["target"]: p["rule"] for p in _plan(proc.stdout) if p.get("target", "").endswith(".weight")}
    assert rules.get("patch_embed.proj.weight") == "dora" and rules.get("blocks.1.mlp.fc2.weight") == "dora", rules


def test_tiny_json_without_dry_run_writes(tmp_path):
    case = TINY_CASES["lora_basic"]
    out = tmp_path / "m.safetensors"
    proc = merge(TINY, case, out, "--json")
    _check_plan(_plan(proc.stdout), case["plan"])
    check_merged(out, tiny_golden(case), TINY / case["base"])


def test_tiny_dry_run_plain_text(tmp_path):
    out = tmp_path / "x.safetensors"
    proc = merge(TINY, TINY_CASES["lora_basic"], out, "--dry-run")
    assert not out.exists() and proc.stdout.strip(), "--dry-run must print a plan and write nothing"
    assert "blocks.0.attn.qkv.weight" in proc.stdout


# ---------------------------------------------------------------------------------------------
# refusals

def _assert_refused(proc, code: str, out: Path) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}, expected 2\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.stderr.rstrip().endswith(f"[{code}]"), f"stderr does not end with [{code}]: {proc.stderr!r}"
    assert not out.exists(), "a refused merge left the output"
    assert temp_leftovers(out.parent) == []


@pytest.mark.parametrize("name", REFUSAL_CASES)
def test_tiny_refusals(name, tmp_path):
    case = TINY_CASES[name]
    out = tmp_path / "never.safetensors"
    _assert_refused(merge(TINY, case, out, check=None), case["refuse"], out)


def test_refuse_unmatched_key(tmp_path):
    """A BERT adapter on the ViT base: no target exists; the message names nearby base tensors."""
    case = {"base": "base.safetensors", "adapters": [["embedding_fanin/bert", 1.0]]}
    out = tmp_path / "never.safetensors"
    proc = merge(TINY, case, out, check=None)
    _assert_refused(proc, "unmatchedKey", out)
    base_names = load_file(str(TINY / "base.safetensors")).keys()
    assert any(n in proc.stderr or n.rsplit(".", 1)[0] in proc.stderr for n in base_names), proc.stderr


def _copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(src / f, dst / f)
    return dst


@pytest.mark.parametrize("breakage", ["bad_json", "missing_config", "no_peft_type"])
def test_refuse_adapter_config(breakage, tmp_path):
    ad = _copy_adapter(TINY / "lora_basic", tmp_path / "ad")
    cfg = ad / "adapter_config.json"
    if breakage == "bad_json":
        cfg.write_text('{"r": 4, "lora_alpha": ')
    elif breakage == "missing_config":
        cfg.unlink()
    else:
        doc = json.loads(cfg.read_text())
        doc.pop("peft_type")
        doc.pop("r")
        cfg.write_text(json.dumps(doc))
    out = tmp_path / "never.safetensors"
    proc = run_ckpt("merge", TINY / "base.safetensors", out, "--lora", ad, check=None)
    _assert_refused(proc, "adapterConfig", out)


def test_refuse_shape_mismatch(tmp_path):
    base = load_file(str(TINY / "base.safetensors"))
    w = base["blocks.0.mlp.fc1.weight"]
    base["blocks.0.mlp.fc1.weight"] = np.ascontiguousarray(w[:, : w.shape[1] - 2])
    bad = tmp_path / "bad_base.safetensors"
    save_file(base, str(bad))
    out = tmp_path / "never.safetensors"
    proc = run_ckpt("merge", bad, out, "--lora", TINY / "lora_basic", check=None)
    _assert_refused(proc, "shapeMismatch", out)


def test_refuse_non_finite(tmp_path):
    ad = _copy_adapter(TINY / "lora_basic", tmp_path / "ad")
    t = load_file(str(ad / "adapter_model.safetensors"))
    key = "base_model.model.blocks.1.mlp.fc2.lora_B.weight"
    t[key] = t[key].copy()
    t[key][0, 0] = np.inf
    save_file(t, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "never.safetensors"
    proc = run_ckpt("merge", TINY / "base.safetensors", out, "--lora", ad, check=None)
    _assert_refused(proc, "nonFinite", out)


@pytest.mark.parametrize("args", [
    ["merge", "BASE"],  # no OUT
    ["merge", "BASE", "OUT", "--lora", "ADAPTER", "--dtype", "F17"],
])
def test_usage_errors(args, tmp_path):
    out = tmp_path / "OUT.safetensors"
    subst = {"BASE": str(TINY / "base.safetensors"), "OUT": str(out), "ADAPTER": str(TINY / "lora_basic")}
    proc = run_ckpt(*[subst.get(a, a) for a in args], check=None)
    assert proc.returncode == 64, f"exit {proc.returncode}: {proc.stderr}"
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# real set: DINOv2 ViT-S/14 (timm names and original transformers-v4 names) and all-MiniLM-L6-v2

def _real_cross_cases() -> dict:
    """Cross-naming merges of the real adapters; goldens are the PEFT goldens renamed."""
    if not REAL_CASES:
        return {}
    vit0 = dict(G.REAL_VIT, num_classes=0)
    return {
        # timm adapter (fused qkv, conv LoRA, head) -> original v4 `backbone.`-prefixed base
        "dinov2_timm_lora_into_v4": {
            "base": REAL_CASES["dinov2_hf_dora_rslora"]["base"], "adapters": [["dinov2_timm_lora", 1.0]],
            "golden_from": ("dinov2_timm_lora", "timm->v4"), "model": "dinov2",
            "model_kwargs": REAL_CASES["dinov2_hf_dora_rslora"]["model_kwargs"], "rename": "dinov2_v4_backbone",
            "outputs": "dinov2_timm_lora/outputs.npz", "compare": {"cls": "features"}},
        # transformers-v5 DoRA adapter on q/v/o_proj -> timm base with fused qkv
        "dinov2_hf_dora_rslora_into_timm": {
            "base": "dinov2_vits14_timm.safetensors", "adapters": [["dinov2_hf_dora_rslora", 1.0]],
            "golden_from": ("dinov2_hf_dora_rslora", "v4->timm"), "model": "vit_timm", "model_kwargs": vit0,
            "outputs": "dinov2_hf_dora_rslora/outputs.npz", "compare": {"features": "cls"}},
    }


REAL_CROSS = _real_cross_cases()


def _real_golden(case: dict) -> dict[str, np.ndarray]:
    if "golden" in case:
        return load_file(str(REAL / case["golden"]))
    src, how = case["golden_from"]
    g = load_file(str(REAL / REAL_CASES[src]["golden"]))
    if how == "timm->v4":
        heads = {k: v for k, v in g.items() if k.startswith("head.")}
        body = G.dinov2_v5_to_v4(G.timm_to_dinov2_v5({k: v for k, v in g.items() if not k.startswith("head.")}),
                                 "backbone.")
        return {**{k: np.ascontiguousarray(v) for k, v in body.items()}, **heads}
    if how == "v4->timm":
        return {k: np.ascontiguousarray(v) for k, v in G.dinov2_v5_to_timm(G.dinov2_v4_to_v5(g, "backbone.")).items()}
    raise ValueError(how)


@REAL_SKIP
@pytest.mark.parametrize("name", sorted(REAL_CASES) + sorted(REAL_CROSS))
def test_real_merge_matches_peft(name, tmp_path):
    case = REAL_CASES.get(name) or REAL_CROSS[name]
    out = tmp_path / "merged.safetensors"
    merge(REAL, case, out)
    got = check_merged(out, _real_golden(case), REAL / case["base"])
    check_forward(case["model"], case["model_kwargs"], got, REAL / case["outputs"], rename=case.get("rename"),
                  compare=case.get("compare"))


@REAL_SKIP
def test_real_dora_rslora_plan(tmp_path):
    """Pattern-resolved ranks/alphas with DoRA + rsLoRA on the real DINOv2, in the base's (v4) names."""
    case = REAL_CASES["dinov2_hf_dora_rslora"]
    proc = merge(REAL, case, tmp_path / "never.safetensors", "--dry-run", "--json")
    assert not (tmp_path / "never.safetensors").exists()
    _check_plan(_plan(proc.stdout), case["plan"])
    ranks = {p["target"]: p["rank"] for p in case["plan"]}
    assert ranks["backbone.encoder.layer.0.attention.attention.query.weight"] == 16
    assert ranks["backbone.encoder.layer.5.mlp.fc2.weight"] == 4
