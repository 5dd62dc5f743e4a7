"""7. ckpt diff: exit codes and metrics against numpy computed in float64."""
from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import run_ckpt

RNG = np.random.default_rng(77)


def _diff_json(a, b, *extra, check):
    proc = run_ckpt("diff", a, b, "--json", *extra, check=check)
    return json.loads(proc.stdout)


def _ref_metrics(a: np.ndarray, b: np.ndarray) -> dict:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    d = a - b
    aa, bb, dd, ab = a @ a, b @ b, d @ d, a @ b
    return {
        "max_abs_error": float(np.max(np.abs(d))) if d.size else 0.0,
        "relative_error": math.sqrt(dd / aa),
        "cosine": ab / (math.sqrt(aa) * math.sqrt(bb)),
        "sqnr_db": 10 * math.log10(aa / dd) if dd > 0 else None,
    }


def _tensors() -> dict[str, np.ndarray]:
    return {
        "big": RNG.standard_normal((300, 257)).astype(np.float32),
        "vec": (RNG.standard_normal(1000) * 2).astype(np.float32),
        "f64": RNG.standard_normal((17, 3)),
        "ids": np.arange(10, dtype=np.int64),
    }


def test_identical_files_exit_0(tmp_path):
    t = _tensors()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.npz"
    save_file(t, a)
    np.savez(b, **t)
    res = _diff_json(a, b, check=0)
    assert res["equal"] is True and res["only_in_a"] == [] and res["only_in_b"] == []
    for e in res["tensors"]:
        assert e["max_abs_error"] == 0.0 and e["equal"] is True
    run_ckpt("diff", a, b, check=0)  # the table form has the same exit status


def test_f32_vs_f16_copy(tmp_path):
    t = _tensors()
    a, b = tmp_path / "a.safetensors", tmp_path / "b16.safetensors"
    save_file(t, a)
    run_ckpt("convert", a, b, "--dtype", "F16")
    run_ckpt("diff", a, b, check=1)
    _diff_json(a, b, "--tolerance", "0", check=1)
    res = _diff_json(a, b, "--tolerance", "1e-2", check=0)
    assert res["equal"] is True and res["tolerance"] == 1e-2

    by_name = {e["name"]: e for e in res["tensors"]}
    assert sorted(by_name) == sorted(t)
    for name, arr in t.items():
        e = by_name[name]
        if arr.dtype.kind == "i":
            assert e["max_abs_error"] == 0.0 and e["dtype_a"] == e["dtype_b"] == "I64"
            continue
        assert e["dtype_a"] == {"float32": "F32", "float64": "F64"}[arr.dtype.name] and e["dtype_b"] == "F16"
        assert e["shape_a"] == e["shape_b"] == list(arr.shape)
        ref = _ref_metrics(arr, arr.astype(np.float16))
        assert ref["max_abs_error"] > 0
        assert abs(e["max_abs_error"] - ref["max_abs_error"]) <= 1e-12, name
        assert e["relative_error"] == pytest.approx(ref["relative_error"], rel=1e-9, abs=0), name
        assert abs(e["cosine"] - ref["cosine"]) <= 1e-9, name
        assert abs(e["sqnr_db"] - ref["sqnr_db"]) <= 1e-9, name
        assert e["nonfinite_mismatches"] == 0


def test_bf16_metrics_match_numpy(tmp_path):
    x = RNG.standard_normal((64, 64)).astype(np.float32)
    y = x.astype(ml_dtypes.bfloat16)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": x}, a)
    save_file({"w": y}, b)
    res = _diff_json(a, b, check=1)
    (e,) = res["tensors"]
    assert e["dtype_b"] == "BF16"
    ref = _ref_metrics(x, y.astype(np.float32))
    assert abs(e["max_abs_error"] - ref["max_abs_error"]) <= 1e-12
    assert abs(e["cosine"] - ref["cosine"]) <= 1e-9
    assert abs(e["sqnr_db"] - ref["sqnr_db"]) <= 1e-9
    assert _diff_json(a, b, "--tolerance", str(ref["max_abs_error"]), check=0)["equal"] is True
    assert _diff_json(a, b, "--tolerance", str(ref["max_abs_error"] * 0.999), check=1)["equal"] is False


def test_names_only_on_one_side(tmp_path):
    t = _tensors()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(t, a)
    save_file({k: v for k, v in t.items() if k != "vec"} | {"extra": np.ones(3, np.float32)}, b)
    res = _diff_json(a, b, check=1)
    assert res["equal"] is False
    assert res["only_in_a"] == ["vec"] and res["only_in_b"] == ["extra"]
    # the shared tensors are still compared and equal
    assert all(e["equal"] for e in res["tensors"])
    assert sorted(e["name"] for e in res["tensors"]) == sorted(set(t) - {"vec"})
    run_ckpt("diff", a, b, check=1)


def test_shape_mismatch_differs(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, w=np.zeros((2, 3), np.float32))
    np.savez(b, w=np.zeros((3, 2), np.float32))
    res = _diff_json(a, b, "--tolerance", "1e9", check=1)
    assert res["tensors"][0]["equal"] is False


def test_nonfinite_must_match(tmp_path):
    x = np.array([1.0, np.nan, np.inf, -np.inf, 2.0], dtype=np.float32)
    a, same, other = tmp_path / "a.npz", tmp_path / "same.npz", tmp_path / "other.npz"
    np.savez(a, x=x)
    np.savez(same, x=x.astype(np.float64))
    y = x.copy()
    y[2] = -np.inf  # +inf vs -inf
    np.savez(other, x=y)
    res = _diff_json(a, same, check=0)
    assert res["tensors"][0]["max_abs_error"] == 0.0 and res["tensors"][0]["nonfinite_mismatches"] == 0
    res = _diff_json(a, other, "--tolerance", "1e30", check=1)
    assert res["tensors"][0]["nonfinite_mismatches"] == 1
    # the finite positions agree exactly
    assert res["tensors"][0]["max_abs_error"] == 0.0
    z = x.copy()
    z[1] = 0.0  # NaN vs a number
    np.savez(other, x=z)
    assert _diff_json(a, other, "--tolerance", "1e30", check=1)["tensors"][0]["nonfinite_mismatches"] == 1


def test_missing_input_is_error(tmp_path):
    a = tmp_path / "a.npz"
    np.savez(a, x=np.zeros(2))
    proc = run_ckpt("diff", a, tmp_path / "nope.npz", check=2)
    assert "nope.npz" in proc.stderr
