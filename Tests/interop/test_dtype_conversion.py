"""3. --dtype conversions are bit-exact against numpy (F16) and ml_dtypes (BF16, F8)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import raw_tensor, run_ckpt

RNG = np.random.default_rng(1234)

F8_TYPES = {
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
    "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}
TARGET_NP = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
TARGET_BITS = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16, "F64": np.uint64}


def _f32(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def _f16_specials() -> np.ndarray:
    v = [0.0, -0.0, np.inf, -np.inf, 1.0, -1.0, 65504.0, -65504.0]
    one_ulp = 2.0**-10
    v += [1 + one_ulp / 2, 1 + 3 * one_ulp / 2, -(1 + one_ulp / 2), 1 + one_ulp / 2 + 2.0**-30]  # ties, just above
    v += [2048 + 1, 2048 + 3, 4096 + 2, 4096 + 6]  # integer ties where f16 ulp is 2 / 4
    v += [2.0**-24, 2.0**-25, -(2.0**-25), 3 * 2.0**-25, 5 * 2.0**-25, 2.0**-25 * 1.0000001, 2.0**-26]  # subnormal ties
    v += [2.0**-14, 2.0**-14 - 2.0**-24, 2.0**-14 - 2.0**-25, 2.0**-14 - 3 * 2.0**-25]  # normal/subnormal border
    v += [65519.0, 65520.0, -65520.0, 65536.0, 1e10, 3.4e38, 1e-10, -1e-30]
    arr = np.array(v, dtype=np.float32)
    extra = [
        np.nextafter(np.float32(65520), np.float32(0)),  # just below the overflow tie → 65504
        np.nextafter(np.float32(65520), np.float32(np.inf)),
        np.nextafter(np.float32(2.0**-25), np.float32(0)),  # just below half the smallest subnormal → 0
        np.finfo(np.float32).smallest_subnormal,
        -np.finfo(np.float32).smallest_subnormal,
        np.finfo(np.float32).tiny,
        np.finfo(np.float32).max,
    ]
    nans = _f32([0x7FC00000, 0xFFC00000])  # quiet NaNs without payload
    return np.concatenate([arr, np.array(extra, dtype=np.float32), nans])


def _random_f32(n: int) -> np.ndarray:
    """Random bit patterns over the whole range (NaNs replaced), plus dense samples near the f16/bf16 subnormal range."""
    bits = RNG.integers(0, 2**32, n, dtype=np.uint32)
    exp = (bits >> 23) & 0xFF
    bits = np.where(exp == 0xFF, bits & 0x807FFFFF, bits)  # NaN/inf → zero-exponent patterns (f32 subnormals)
    near = RNG.integers(0, 2**32, n // 4, dtype=np.uint32)
    near = (near & 0x807FFFFF) | (RNG.integers(95, 145, n // 4, dtype=np.uint32) << 23)
    normal = RNG.standard_normal(n // 4).astype(np.float32)
    return np.concatenate([_f32(bits), _f32(near), normal])


def _convert(tmp_path, tensors: dict[str, np.ndarray], target: str, *, raw_dtypes: dict | None = None) -> dict:
    src, out = tmp_path / "in.safetensors", tmp_path / f"out_{target}.safetensors"
    save_file(tensors, src)
    run_ckpt("convert", src, out, "--dtype", target)
    return {name: raw_tensor(out, name, TARGET_BITS[target]) for name in tensors}


def _assert_bits(got_bits: np.ndarray, want: np.ndarray, what: str) -> None:
    want_bits = want.view(got_bits.dtype)
    assert got_bits.shape == want_bits.shape
    bad = np.flatnonzero(got_bits.ravel() != want_bits.ravel())
    assert bad.size == 0, (
        f"{what}: {bad.size} mismatches; first: " +
        ", ".join(f"[{i}] got {got_bits.ravel()[i]:#x} want {want_bits.ravel()[i]:#x}" for i in bad[:8])
    )


def test_f32_to_f16_matches_numpy(tmp_path):
    x = np.concatenate([_f16_specials(), _random_f32(400_000)])
    got = _convert(tmp_path, {"x": x}, "F16")["x"]
    with np.errstate(all="ignore"):
        _assert_bits(got, x.astype(np.float16), "F32→F16")
    # the output is a real F16 tensor for the safetensors binding
    assert load_file(tmp_path / "out_F16.safetensors")["x"].dtype == np.float16


def test_f32_to_bf16_matches_ml_dtypes(tmp_path):
    bf_ulp = 2.0**-7
    specials = np.array(
        [1 + bf_ulp / 2, 1 + 3 * bf_ulp / 2, -(1 + bf_ulp / 2), 2.0**-133, 2.0**-134, 3 * 2.0**-134,
         np.finfo(np.float32).max, -np.finfo(np.float32).max, 3.3961e38, 1e-45, -1e-45],
        dtype=np.float32,
    )
    nans = _f32([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FA00000, 0x7FFFFFFF, 0x7FC01234, 0xFFFFE000])
    x = np.concatenate([_f16_specials(), specials, nans, _random_f32(400_000)])
    got = _convert(tmp_path, {"x": x}, "BF16")["x"]
    with np.errstate(invalid="ignore"):
        want = x.astype(ml_dtypes.bfloat16)
    # ml_dtypes turns every NaN into the canonical quiet NaN 0x7FC0 / 0xFFC0, keeping the sign
    assert set(want.view(np.uint16)[np.isnan(x)].tolist()) == {0x7FC0, 0xFFC0}
    _assert_bits(got, want, "F32→BF16")


def test_f32_to_f16_nan_payloads_stay_nan_with_sign(tmp_path):
    """Signalling / payload NaNs: numpy's own result depends on the conversion path (its f64→f16 cast quiets them,
    its f32→f16 software path keeps the signalling bit), so only NaN-ness and sign are required."""
    x = _f32([0x7F800001, 0xFF800001, 0x7FA00000, 0x7FFFFFFF, 0x7F802000, 0xFFFFE000, 0x7FC01234])
    got = _convert(tmp_path, {"x": x}, "F16")["x"]
    as_f16 = got.view(np.float16)
    assert np.isnan(as_f16).all()
    assert (np.signbit(as_f16) == np.signbit(x)).all()


def test_f64_to_f16_single_rounding_matches_numpy(tmp_path):
    # values where f64→f32→f16 (double rounding) differs from direct f64→f16
    ulp = 2.0**-10
    tricky = np.array([1 + ulp / 2 + 2.0**-40, 1 + ulp / 2 - 2.0**-40, 1 + 3 * ulp / 2 - 2.0**-40,
                       2.0**-25 + 2.0**-60, 2.0**-25 - 2.0**-60, 65520.0 - 2.0**-30, 65520.0, 1e300, -1e-300,
                       np.nextafter(2.0**-14, 0), 0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan])
    # the tricky values must really tell the two roundings apart, or the test proves nothing
    with np.errstate(all="ignore"):
        assert (tricky.astype(np.float16).view(np.uint16) != tricky.astype(np.float32).astype(np.float16).view(np.uint16)).any()
    rand = np.concatenate([RNG.standard_normal(100_000) * 10.0 ** RNG.integers(-9, 6, 100_000),
                           RNG.integers(0, 2**64, 100_000, dtype=np.uint64).view(np.float64)])
    rand = rand[~np.isnan(rand)]
    x = np.concatenate([tricky, rand])
    got = _convert(tmp_path, {"x": x}, "F16")["x"]
    with np.errstate(all="ignore"):
        _assert_bits(got, x.astype(np.float16), "F64→F16")


def test_f16_and_bf16_to_f32_exact(tmp_path):
    all16 = np.arange(2**16, dtype=np.uint16)
    tensors = {"h": all16.view(np.float16), "b": all16.view(ml_dtypes.bfloat16)}
    got = _convert(tmp_path, tensors, "F32")
    h32 = tensors["h"].astype(np.float32)
    b32 = tensors["b"].astype(np.float32)
    for name, want in (("h", h32), ("b", b32)):
        g = got[name].view(np.float32)
        nan = np.isnan(want)
        assert (np.isnan(g) == nan).all(), name
        _assert_bits(got[name][~nan], want[~nan], f"{name}→F32 (non-NaN)")
        assert (np.signbit(g[nan]) == np.signbit(want[nan])).all(), name
    # BF16→F32 is a pure widening: every code, NaNs included, is the top half of the F32
    _assert_bits(got["b"], (all16.astype(np.uint32) << 16).view(np.float32), "BF16→F32 bits")


def test_f32_to_f64_exact(tmp_path):
    x = np.concatenate([_f16_specials(), _random_f32(10_000)])
    got = _convert(tmp_path, {"x": x}, "F64")["x"]
    _assert_bits(got, x.astype(np.float64), "F32→F64")


@pytest.mark.parametrize("target", ["F32", "F16", "BF16", "F64"])
@pytest.mark.parametrize("code", sorted(F8_TYPES))
def test_all_f8_codes(tmp_path, code, target):
    f8 = np.arange(256, dtype=np.uint8).view(F8_TYPES[code])
    got = _convert(tmp_path, {"x": f8}, target)["x"]
    with np.errstate(all="ignore"):
        want = f8.astype(TARGET_NP[target])
    as_float = got.view(TARGET_NP[target]).astype(np.float64)
    want_float = want.astype(np.float64)
    nan = np.isnan(want_float)
    assert (np.isnan(as_float) == nan).all(), f"{code}→{target}: NaN codes {np.flatnonzero(np.isnan(as_float))} " \
                                             f"want {np.flatnonzero(nan)}"
    _assert_bits(got[~nan], want[~nan], f"{code}→{target}")


def test_f8_header_dtype_and_integers_pass_through(tmp_path):
    tensors = {
        "e4": np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn),
        "ids": np.arange(-3, 3, dtype=np.int64),
        "mask": np.array([True, False]),
        "u8": np.arange(4, dtype=np.uint8),
    }
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, src)
    run_ckpt("convert", src, out, "--dtype", "BF16")
    from conftest import read_safetensors_raw

    _, header, _ = read_safetensors_raw(out)
    assert {k: v["dtype"] for k, v in header.items()} == {"e4": "BF16", "ids": "I64", "mask": "BOOL", "u8": "U8"}
    assert (raw_tensor(out, "ids", np.int64) == tensors["ids"]).all()
    assert (raw_tensor(out, "mask", np.bool_) == tensors["mask"]).all()
    assert (raw_tensor(out, "u8", np.uint8) == tensors["u8"]).all()


def _random_f64(n: int) -> np.ndarray:
    bits = RNG.integers(0, 2**64, n, dtype=np.uint64)
    near = RNG.integers(0, 2**52, n, dtype=np.uint64) | (RNG.integers(1023 - 140, 1023 + 130, n).astype(np.uint64) << 52)
    x = np.concatenate([bits.view(np.float64), near.view(np.float64), np.array([0.0, -0.0, np.inf, -np.inf])])
    return x[~np.isnan(x)]


def _assert_non_nan_bits(got_bits: np.ndarray, want: np.ndarray, what: str) -> None:
    """Bit-exact away from NaN; NaN at the same positions with the same sign (payload handling is not specified)."""
    as_float = got_bits.view(want.dtype).astype(np.float64)
    want_float = want.astype(np.float64)
    nan = np.isnan(want_float)
    assert (np.isnan(as_float) == nan).all(), what
    assert (np.signbit(as_float[nan]) == np.signbit(want_float[nan])).all(), what
    _assert_bits(got_bits[~nan], want[~nan], what)


def test_f64_to_f32_matches_numpy(tmp_path):
    x = np.concatenate([_random_f64(200_000), [np.nan, -np.nan, 2.0**-150, 2.0**-149 * 1.5, 3.4028235677973366e38]])
    got = _convert(tmp_path, {"x": x}, "F32")["x"]
    with np.errstate(all="ignore"):
        _assert_bits(got, x.astype(np.float32), "F64→F32")


def test_all_f16_bf16_codes_cross_conversion(tmp_path):
    """Every F16 code → BF16 and every BF16 code → F16, F64 against ml_dtypes / numpy."""
    codes = np.arange(2**16, dtype=np.uint16)
    h, b = codes.view(np.float16), codes.view(ml_dtypes.bfloat16)
    with np.errstate(all="ignore"):
        to_bf16 = _convert(tmp_path, {"h": h}, "BF16")["h"]
        _assert_non_nan_bits(to_bf16, h.astype(ml_dtypes.bfloat16), "F16→BF16")
        to_f16 = _convert(tmp_path, {"b": b}, "F16")["b"]
        _assert_non_nan_bits(to_f16, b.astype(np.float16), "BF16→F16")
        to_f64 = _convert(tmp_path, {"h": h, "b": b}, "F64")
        _assert_non_nan_bits(to_f64["h"], h.astype(np.float64), "F16→F64")
        _assert_non_nan_bits(to_f64["b"], b.astype(np.float64), "BF16→F64")


def _f64_to_bf16_single_rounding(x: np.ndarray) -> np.ndarray:
    """Correctly rounded (one RNE step) float64 → bfloat16: round to odd into float32 (16 spare bits), then RNE."""
    with np.errstate(all="ignore"):
        r = x.astype(np.float32)
        back = r.astype(np.float64)
        inexact = (back != x) & np.isfinite(x)
        # truncate toward zero where float32 rounding went away from zero, then force the last bit odd
        away = inexact & (np.abs(back) > np.abs(x))
        r = np.where(away, np.nextafter(r, np.float32(0)), r)
        bits = r.view(np.uint32) | inexact.astype(np.uint32)
        return bits.view(np.float32).astype(ml_dtypes.bfloat16)


def test_f64_to_bf16_single_rounding(tmp_path):
    """ckpt rounds F64 → BF16 once (round to nearest even on the exact value), like its F64 → F16 and numpy's
    float64 → float16. ml_dtypes' float64 → bfloat16 cast goes through float32 (two roundings) and differs on
    a few values; those are checked to really be double-rounding cases."""
    x = _random_f64(300_000)
    ulp = 2.0**-7
    x = np.concatenate([x, [1 + ulp / 2 + 2.0**-40, 1 + ulp / 2 - 2.0**-40, 1 + ulp / 2, 1 + 3 * ulp / 2,
                            float.fromhex("0x1.5affffeb15483p-91"), 2.0**-134, 2.0**-134 + 2.0**-170, 1e300, -1e-300]])
    want = _f64_to_bf16_single_rounding(x)
    got = _convert(tmp_path, {"x": x}, "BF16")["x"]
    _assert_bits(got, want, "F64→BF16 (single rounding)")
    with np.errstate(all="ignore"):
        ml = x.astype(ml_dtypes.bfloat16).view(np.uint16)
        via_f32 = x.astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    differs = ml != want.view(np.uint16)
    assert (ml[differs] == via_f32[differs]).all()
