"""`ckpt quantize` against the runtimes that load its outputs (formats/mlx.md, formats/compressed-tensors.md, GGUF).

Inputs are small synthetic ViT-like checkpoints built here (F32 and an F16 copy): two groupable Linear weights with
edge-case groups (all zero, constant, one-signed, exact grid points and ties, large and tiny magnitudes), a Linear
with 100 input columns (no group size divides it), biases, a norm, a 4-D conv, a position embedding and a class
token; rows of exact ties (see synthetic_tensors) make rounding-order differences visible. Plus the real DINOv2-S
folder (.cache/dinov2/dinov2-small-224) where present. CKPT_BIN selects the binary (conftest.py).

1. MLX rtn, every bits x group size, F32 and F16: weight/scales/biases equal `mx.quantize` bit for bit; config.json's
   quantization blocks; `mx.load` reads the file; ckpt's readback (`ckpt convert`) is exactly scales*q + biases in
   F32 rounded once to the weight dtype, and `mx.dequantize` equals it within 1 ulp (F32) or within its own two
   F16 roundings (F16); `nn.QuantizedLinear` with the stored weights equals an F64 matmul with the dequantized
   weights within a rounding bound; every other tensor is passed through byte for byte, the conv and the
   100-column Linear reported as kept with a reason.
2. MLX mse/hqq: loadable by mlx, readbacks agree; mse's squared error <= rtn's per tensor; --json's SQNR equals the
   SQNR of the stored values (0.001 dB; the F16 readback's extra rounding is allowed 0.15 dB).
3. GGUF Q8_0/Q4_0/Q4_1/Q5_0/Q5_1: gguf.GGUFReader reads the file; block bytes equal gguf.quants.quantize, whose
   dequantize equals ckpt's readback exactly; kept tensors keep dtype and values; general.* keys; hqq refused.
   Q4_K/Q6_K: gguf-py dequantizes them to ckpt's readback; rows that are not whole super-blocks fall back to
   Q5_0/Q8_0 (llama.cpp's rule), bit-identical to gguf-py.
4. compressed-tensors sym/asym, bits {2,3,4,8} x group {32,128,channel}: PackedQuantizationCompressor.decompress
   equals ckpt's readback exactly (F32 and F16); rtn codes/scales/zero points equal compressed-tensors' own
   calculate_qparams + quantize + pack_to_int32 exactly (F32); weight_shape, zero points, ignore list, version;
   ModelCompressor decompresses a whole torch model built with the same module names.
5. dequantized output equals ckpt's own MLX (and symmetric compressed-tensors) readback bit for bit; dtype kept.
6. `ckpt inspect` shows the logical tensors and how each is stored; `ckpt diff SRC OUT` reports quantize's SQNR.
7. Errors: NaN weights, bad flags (exit 64), bad regex, output == input, corrupt or config-less MLX folders.
8. --only/--skip selection, the per-tensor report and the size totals against the files.
9. DINOv2-S: MLX 4-bit g64 equals mx.quantize for all 72 Linear weights; config.json and preprocessor_config.json.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import REPO, assert_same_array, read_safetensors_raw, run_ckpt, temp_leftovers

DINO_FOLDER = REPO / ".cache" / "dinov2" / "dinov2-small-224"

QKV, FC1, FC2 = "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"
CONV = "patch_embed.proj.weight"
LINEARS = (QKV, FC1, FC2)
BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
DTYPES = {"F32": np.float32, "F16": np.float16}
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# K-quants and the 32-block type a row that is not whole 256-value super-blocks falls back to (llama.cpp's rule)
GGUF_K_TYPES = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


# ---------------------------------------------------------------------------------------------------------------
# inputs


def synthetic_tensors(dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261124)
    qkv = (rng.standard_normal((96, 128)) * 0.05).astype(np.float32)
    fc1 = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
    fc1[0, :128] = 0  # all-zero groups
    fc1[1, :64] = 0.125  # constant groups
    fc1[2, :] = np.abs(fc1[2, :])  # one-signed rows
    fc1[3, :] = -np.abs(fc1[3, :])
    fc1[4, :32] = np.linspace(-1, 1, 32, dtype=np.float32)  # exact grid points and ties
    fc1[4, 32:64] = np.arange(32, dtype=np.float32) / 8 - 2  # a dyadic ramp: ties at every bit width
    fc1[5, 64:128] *= 40  # large magnitudes
    fc1[6, :] *= 1e-4  # tiny magnitudes
    fc1[7, 10] = 3.0  # one outlier in a group
    # Exact ties, two rows per bit width, every 32 columns holding the row's min and max (so any group size sees
    # the same range): (a) MLX affine: min -2^(b-1)*S, max (2^(b-1)-1)*S with S = 3/128 makes the scale exactly S
    # (whose reciprocal is inexact) and the bias the min, and min + (k+1/2)*S lands halfway between codes, where
    # a division and a multiplication by 1/S round differently; (b) compressed-tensors: min = -max = (2^b-1)/2*S'
    # with S' = 1/32 makes the scale exactly S' (symmetric and asymmetric), the asymmetric zero point exactly -1/2,
    # and every w/S' (min and max included) halfway between codes.
    for i, b in enumerate(BITS):
        n, half = 2**b - 1, 2 ** (b - 1)
        k = np.resize(np.arange(n), 30)
        s_a, s_b = np.float32(3 / 128), np.float32(1 / 32)
        row_a = np.concatenate([[-half * s_a, (half - 1) * s_a], -half * s_a + (k + 0.5) * s_a])
        row_b = np.concatenate([[-n / 2 * s_b, n / 2 * s_b], (k - half + 0.5) * s_b])
        qkv[10 + 2 * i] = np.tile(row_a, 4)
        qkv[11 + 2 * i] = np.tile(row_b, 4)
    t = {
        QKV: qkv,
        "blocks.0.attn.qkv.bias": rng.standard_normal(96) * 0.01,
        FC1: fc1,
        "blocks.0.mlp.fc1.bias": rng.standard_normal(64) * 0.01,
        FC2: rng.standard_normal((32, 100)) * 0.05,  # 100 input columns: no group size divides it
        "blocks.0.mlp.fc2.bias": rng.standard_normal(32) * 0.01,
        "blocks.0.norm1.weight": 1 + rng.standard_normal(32) * 0.1,
        "blocks.0.norm1.bias": rng.standard_normal(32) * 0.1,
        CONV: rng.standard_normal((32, 3, 4, 4)) * 0.1,
        "pos_embed": rng.standard_normal((1, 17, 32)) * 0.02,
        "cls_token": rng.standard_normal((1, 1, 32)) * 0.02,
    }
    return {k: np.ascontiguousarray(v).astype(dtype) for k, v in t.items()}


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    """{"F32": (path, tensors), "F16": (path, tensors)}."""
    root = tmp_path_factory.mktemp("quant-src")
    result = {}
    for label, dtype in DTYPES.items():
        tensors = synthetic_tensors(dtype)
        path = root / f"src-{label.lower()}.safetensors"
        save_file(tensors, str(path))
        result[label] = (path, tensors)
    return result


def groupable(name: str, src: dict, group: int | None) -> bool:
    """Whether `name` is a Linear weight ckpt quantizes at this group size (None = per channel / ggml block 32)."""
    return name in LINEARS and (group is None or src[name].shape[1] % group == 0)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def quantize(src, out, *args, check: int | None = 0):
    """Runs `ckpt quantize SRC OUT ARGS --json`; returns the parsed report (or the process when check != 0)."""
    proc = run_ckpt("quantize", src, out, *args, "--json", check=check, timeout=300)
    if check == 0:
        return json.loads(proc.stdout)
    return proc


def readback(path, tmp: Path, tag: str = "rb") -> dict[str, np.ndarray]:
    """ckpt's own reading of `path` (dequantized), via `ckpt convert PATH x.safetensors`."""
    out = tmp / f"{tag}.safetensors"
    run_ckpt("convert", path, out, timeout=300)
    return load_file(str(out))


def report_by_name(report: dict) -> dict[str, dict]:
    return {t["name"]: t for t in report["tensors"]}


def data_section_size(path) -> int:
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return len(blob) - 8 - n


def stored_bytes(path, names) -> int:
    _, header, _ = read_safetensors_raw(path)
    return sum(header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names)


def sq_error(w, w_hat) -> float:
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.sum(d * d))


def sqnr_db(w, w_hat) -> float:
    w = np.asarray(w, np.float64)
    return float(10 * np.log10(np.sum(w * w) / sq_error(w, w_hat)))


def assert_within_ulp(got: np.ndarray, want: np.ndarray, *, ulps: int = 1, name: str = "") -> None:
    """|got - want| <= `ulps` units in the last place of the larger of the two, in got's dtype."""
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    g, w = got.astype(np.float64), want.astype(np.float64)
    big = np.maximum(np.abs(got), np.abs(want)).astype(got.dtype)
    tol = np.spacing(big).astype(np.float64) * ulps
    bad = np.abs(g - w) > tol
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} elements differ by more than {ulps} ulp, e.g. at {np.argwhere(bad)[0].tolist()}: "
        f"{g[bad][0]!r} vs {w[bad][0]!r}")


def unpack_codes(words: np.ndarray, cols: int, bits: int) -> np.ndarray:
    """Codes of an LSB-first packed [rows, words] uint32/int32 array (formats/mlx.md), as int64 [rows, cols]."""
    rows = words.shape[0]
    stream = np.unpackbits(np.ascontiguousarray(words).view(np.uint8).reshape(rows, -1), axis=1, bitorder="little")
    return stream[:, : cols * bits].reshape(rows, cols, bits).astype(np.int64) @ (1 << np.arange(bits))


def mlx_unrounded(words, scales, biases, group: int, bits: int) -> np.ndarray:
    """`scales*q + biases` in float32 from the stored MLX triplet, before any rounding to the weight dtype."""
    q = unpack_codes(words, words.shape[1] * 32 // bits, bits)
    s, b = np.repeat(scales, group, axis=1), np.repeat(biases, group, axis=1)
    return q.astype(np.float32) * s.astype(np.float32) + b.astype(np.float32)


def ct_unrounded(local: dict, bits: int) -> np.ndarray:
    """`(q - zero_point)*scale` in float32 from a compressed-tensors module's stored tensors (numpy arrays)."""
    rows, cols = (int(d) for d in local["weight_shape"])
    scale = local["weight_scale"].astype(np.float32)
    group = cols // scale.shape[1]
    q = unpack_codes(local["weight_packed"], cols, bits)
    if "weight_zero_point" in local:
        zp = unpack_codes(np.ascontiguousarray(local["weight_zero_point"].T), rows, bits).T  # packed along rows
    else:
        zp = np.full(scale.shape, 2 ** (bits - 1))
    z = np.repeat(zp, group, axis=1)
    return (q - z).astype(np.float32) * np.repeat(scale, group, axis=1)


def check_reported_error(entry: dict, w: np.ndarray, unrounded: np.ndarray, file_values: np.ndarray, *, name: str):
    """quantize's sqnr_db/max_error describe the file: the dequantized values as a reader gets them (rounded to
    the weight dtype for F16 weights), within 0.001 dB; `unrounded` (the float32 values before that rounding)
    is within the F16 rounding of it."""
    assert abs(entry["sqnr_db"] - sqnr_db(w, file_values)) <= 1e-3, (name, entry["sqnr_db"], sqnr_db(w, file_values))
    max_err = float(np.abs(w.astype(np.float64) - file_values.astype(np.float64)).max())
    assert abs(entry["max_error"] - max_err) <= 1e-6 * max(1.0, max_err), (name, entry["max_error"], max_err)
    tol = 1e-3 if w.dtype == np.float32 else 0.15
    assert abs(entry["sqnr_db"] - sqnr_db(w, unrounded)) <= tol, (name, entry["sqnr_db"], sqnr_db(w, unrounded))


def check_mlx_readback(rb: np.ndarray, mx_deq: np.ndarray, words, scales, biases, group: int, bits: int, *, name: str):
    """ckpt's readback of an MLX triplet is `scales*q + biases` computed in float32 and rounded once to the scales'
    dtype (formats/mlx.md), exactly. mx.dequantize computes in the scales' dtype: in F32 that is the same value
    within 1 ulp; in F16 its product and its sum are each rounded to F16, so it may differ by one F16 ulp of the
    product plus one of the result (and is checked to be exactly that F16 computation)."""
    cols = words.shape[1] * 32 // bits
    q = unpack_codes(words, cols, bits)
    s, b = np.repeat(scales, group, axis=1), np.repeat(biases, group, axis=1)
    want = (q.astype(np.float32) * s.astype(np.float32) + b.astype(np.float32)).astype(scales.dtype)
    assert_same_array(rb, want, name=f"{name}: readback vs float32 scales*q + biases")
    if scales.dtype == np.float32:
        assert_within_ulp(rb, mx_deq, name=f"{name}: readback vs mx.dequantize")
        return
    product = (q.astype(scales.dtype) * s).astype(scales.dtype)
    assert_same_array(mx_deq, (product + b).astype(scales.dtype), name=f"{name}: mx.dequantize vs F16 arithmetic")
    tol = np.spacing(np.abs(product)).astype(np.float64) + np.spacing(np.abs(rb)).astype(np.float64)
    diff = np.abs(rb.astype(np.float64) - mx_deq.astype(np.float64))
    assert (diff <= tol).all(), f"{name}: readback and mx.dequantize differ by more than the F16 roundings"


def assert_passthrough(out_tensors: dict, src: dict, names, *, label: str) -> None:
    for name in names:
        assert name in out_tensors, f"{label}: kept tensor {name} missing"
        assert_same_array(out_tensors[name], src[name], name=f"{label} {name}")


def affine_rtn(w: np.ndarray, group: int, bits: int):
    """formats/mlx.md's RTN rule in numpy float32 (used where MLX itself has no such group size)."""
    n = np.float32(2**bits - 1)
    rows, cols = w.shape
    g = w.astype(np.float32).reshape(rows, cols // group, group)
    lo, hi = g.min(-1), g.max(-1)
    use_min = np.abs(lo) > np.abs(hi)
    scale = np.maximum((hi - lo) / n, np.float32(1e-7)).astype(np.float32)
    scale = np.where(use_min, scale, -scale).astype(np.float32)
    edge = np.where(use_min, lo, hi).astype(np.float32)
    q0 = np.rint(edge / scale).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(q0 != 0, edge / q0, scale).astype(np.float32)
    bias = np.where(q0 != 0, edge, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint((g - bias[..., None]) / scale[..., None]), 0, n).astype(np.float32)
    return q.reshape(rows, cols), scale, bias


# ---------------------------------------------------------------------------------------------------------------
# 1. MLX rtn against mx.quantize


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_mlx_rtn_matches_mx_quantize(sources, tmp_path, bits, group, dtype):
    import mlx.core as mx
    import mlx.nn as nn

    src_path, src = sources[dtype]
    out = tmp_path / "mlx"
    report = quantize(src_path, out, "--format", "mlx", "--bits", bits, "--group-size", group)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    config = json.loads((out / "config.json").read_text())
    block = {"bits": bits, "group_size": group, "mode": "affine"}
    assert config["quantization"] == block and config["quantization_config"] == block

    arrays, metadata = mx.load(str(out / "model.safetensors"), return_metadata=True)
    assert metadata.get("format") == "mlx"
    quantized = [n for n in src if groupable(n, src, group)]
    assert quantized == [QKV, FC1]
    expected_names = set(src) | {n[: -len(".weight")] + s for n in quantized for s in (".scales", ".biases")}
    assert set(arrays) == expected_names

    rb = readback(out, tmp_path)
    assert set(rb) == set(src), "ckpt's readback does not give back the logical tensors"
    rng = np.random.default_rng(bits * 1000 + group)
    for name in quantized:
        module = name[: -len(".weight")]
        w = src[name]
        wq, s, b = mx.quantize(mx.array(w), group_size=group, bits=bits)
        got_w, got_s, got_b = arrays[name], arrays[module + ".scales"], arrays[module + ".biases"]
        assert_same_array(np.array(got_w), np.array(wq), name=f"{name} codes")
        assert_same_array(np.array(got_s), np.array(s), name=f"{name} scales")
        assert_same_array(np.array(got_b), np.array(b), name=f"{name} biases")

        # mlx's dequantization of the stored triplet is what ckpt reads back.
        deq = np.array(mx.dequantize(got_w, got_s, got_b, group_size=group, bits=bits))
        assert rb[name].dtype == w.dtype
        check_mlx_readback(rb[name], deq, np.array(got_w), np.array(got_s), np.array(got_b), group, bits, name=name)

        # a QuantizedLinear holding the file's tensors computes x @ W_deq^T + b.
        out_dim, in_dim = w.shape
        layer = nn.QuantizedLinear(in_dim, out_dim, bias=True, group_size=group, bits=bits)
        layer.load_weights([("weight", got_w), ("scales", got_s), ("biases", got_b), ("bias", arrays[module + ".bias"])])
        x = rng.standard_normal((5, in_dim)).astype(w.dtype)
        y = np.array(layer(mx.array(x))).astype(np.float64)
        w_deq, bias = rb[name].astype(np.float64), src[module + ".bias"].astype(np.float64)
        ref = x.astype(np.float64) @ w_deq.T + bias
        # rounding bound: 16 units of roundoff of the dtype times sum |x_j w_ij| + |b_i| (F16 accumulates in F16)
        tol = 16 * np.finfo(w.dtype).eps / 2 * (np.abs(x.astype(np.float64)) @ np.abs(w_deq).T + np.abs(bias))
        assert (np.abs(y - ref) <= tol).all(), (
            f"{name}: QuantizedLinear differs from the dequantized matmul by {np.abs(y - ref).max():.3g}")

    kept = [n for n in src if n not in quantized]
    assert_passthrough({k: np.array(v) for k, v in arrays.items() if k in kept}, src, kept, label="mlx")
    assert_passthrough(rb, src, kept, label="mlx readback")

    by_name = report_by_name(report)
    assert set(by_name) == set(src)
    for name in quantized:
        t = by_name[name]
        assert t["quantized"] and t["bits"] == bits and t["group_size"] == group and t["layout"] == f"mlx-affine {bits}-bit g{group}"
    assert not by_name[CONV]["quantized"] and "conv" in by_name[CONV]["kept"]
    assert not by_name[FC2]["quantized"]
    assert "100" in by_name[FC2]["kept"] and str(group) in by_name[FC2]["kept"], by_name[FC2]
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"):
        assert not by_name[name]["quantized"] and by_name[name]["kept"], by_name[name]


# ---------------------------------------------------------------------------------------------------------------
# 2. MLX mse and hqq


MSE_HQQ_CASES = [(2, 32), (3, 64), (4, 128), (8, 32)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits,group", MSE_HQQ_CASES)
def test_mlx_mse_and_hqq(sources, tmp_path, bits, group, dtype):
    import mlx.core as mx

    src_path, src = sources[dtype]
    quantized = [n for n in src if groupable(n, src, group)]
    errors, readbacks = {}, {}
    for method in ("rtn", "mse", "hqq"):
        out = tmp_path / method
        report = quantize(src_path, out, "--format", "mlx", "--bits", bits, "--group-size", group, "--method", method)
        arrays = mx.load(str(out / "model.safetensors"))
        rb = readbacks[method] = readback(out, tmp_path, method)
        by_name = report_by_name(report)
        for name in quantized:
            module = name[: -len(".weight")]
            triplet = arrays[name], arrays[module + ".scales"], arrays[module + ".biases"]
            deq = np.array(mx.dequantize(*triplet, group_size=group, bits=bits))
            check_mlx_readback(rb[name], deq, *(np.array(a) for a in triplet), group, bits, name=f"{method} {name}")
            errors[method, name] = sq_error(src[name], rb[name])
            t = by_name[name]
            assert t["quantized"] and t["bits"] == bits and t["group_size"] == group
            check_reported_error(t, src[name], mlx_unrounded(*(np.array(a) for a in triplet), group, bits), rb[name],
                                 name=f"{method} {name}")
        for name in src:
            if name not in quantized:
                assert_same_array(rb[name], src[name], name=f"{method} kept {name}")
    for name in quantized:
        # the clipping search starts with the unclipped range, so it is never worse than rtn
        assert errors["mse", name] <= errors["rtn", name] * (1 + 1e-6), (name, errors["mse", name], errors["rtn", name])
        assert not np.array_equal(readbacks["hqq"][name], readbacks["rtn"][name]), f"{name}: hqq changed nothing"
    if bits <= 4:
        total = {m: sum(errors[m, n] for n in quantized) for m in ("rtn", "mse")}
        assert total["mse"] < total["rtn"], f"mse found no better clipping than rtn at {bits} bits: {total}"


def hqq_affine_reference(w: np.ndarray, group: int, bits: int):
    """formats/quantization.md's HQQ on the affine grid in float64, every group at once: start from MLX's min-max
    parameters, then per iteration codes, the Lp (p = 0.7) shrinkage of the error with beta = 10 (x1.01 each
    iteration) and the least-squares (scale, bias) of the shrunk target onto the codes; each group keeps the
    iterate with the least mean |error| and stops when it no longer falls (at most 20 iterations)."""
    n = 2**bits - 1
    _, s32, b32 = affine_rtn(w.astype(np.float32), group, bits)
    g = w.astype(np.float64).reshape(-1, group)
    s, b = s32.reshape(-1).astype(np.float64), b32.reshape(-1).astype(np.float64)
    best_s, best_b, best = s.copy(), b.copy(), np.full(len(g), np.inf)
    active, beta = np.ones(len(g), bool), 10.0
    for _ in range(20):
        q = np.clip(np.rint((g - b[:, None]) / s[:, None]), 0, n)
        e = g - (q * s[:, None] + b[:, None])
        a = np.abs(e)
        err = a.mean(1)
        improved = active & (err < best)
        best, best_s, best_b = np.where(improved, err, best), np.where(improved, s, best_s), np.where(improved, b, best_b)
        active &= improved
        with np.errstate(divide="ignore"):
            t = g - np.sign(e) * np.maximum(0, a - np.power(a, -0.3) / beta)
        sq, sqq, st, sqt = q.sum(1), (q * q).sum(1), t.sum(1), (q * t).sum(1)
        det = group * sqq - sq * sq
        active &= det > 1e-12 * group * sqq
        new_s = (group * sqt - sq * st) / np.where(active, det, 1)
        s = np.where(active, new_s, s)
        b = np.where(active, (st - new_s * sq) / group, b)
        beta *= 1.01
    return best_s.reshape(w.shape[0], -1), best_b.reshape(w.shape[0], -1)


@pytest.mark.parametrize("magnitude", [1, 50])
@pytest.mark.parametrize("bits,group", [(3, 64), (4, 32)])
def test_mlx_hqq_matches_float64_reference(sources, tmp_path, bits, group, magnitude):
    """--method hqq on the affine grid against the algorithm written out in float64 numpy: the scales and biases
    agree (but for the few groups where float32 and float64 round a near-tie apart and stop at different iterations), and every group's mean
    |error| is at most that of mx.quantize's own (RTN) parameters. At the synthetic weights' own magnitude (~0.02)
    |e|^-0.3 / beta exceeds every error, so W_e = 0 and each step is plain least squares; scaled by 50 the
    shrinkage acts."""
    import mlx.core as mx

    _, base = sources["F32"]
    src = {n: v * np.float32(magnitude) for n, v in base.items() if groupable(n, base, group)}
    src_path = tmp_path / "src.safetensors"
    save_file(src, str(src_path))
    out = tmp_path / "hqq"
    quantize(src_path, out, "--format", "mlx", "--bits", bits, "--group-size", group, "--method", "hqq")
    arrays = mx.load(str(out / "model.safetensors"))
    for name, w in src.items():
        module = name[: -len(".weight")]
        scales, biases = np.array(arrays[module + ".scales"]), np.array(arrays[module + ".biases"])
        ref_s, ref_b = hqq_affine_reference(w, group, bits)
        close = np.isclose(scales, ref_s, rtol=1e-4, atol=0) & np.isclose(biases, ref_b, rtol=1e-4, atol=1e-4 * np.abs(ref_s))
        _, rtn_s, _ = affine_rtn(w, group, bits)
        moved = ~np.isclose(ref_s, rtn_s, rtol=1e-4, atol=0)  # groups where the splitting left MLX's start
        assert moved.mean() > 0.5, f"{name}: the reference left min-max in only {moved.mean():.3f} of the groups"
        assert close[moved].mean() >= 0.98, f"{name}: only {close[moved].mean():.3f} of the moved groups have the reference's parameters"
        deq = np.array(mx.dequantize(arrays[name], arrays[module + ".scales"], arrays[module + ".biases"], group_size=group, bits=bits))
        rtn = np.array(mx.dequantize(*mx.quantize(mx.array(w), group_size=group, bits=bits), group_size=group, bits=bits))
        hqq_err = np.abs(w - deq).reshape(-1, group).mean(1)
        rtn_err = np.abs(w - rtn).reshape(-1, group).mean(1)
        assert np.all(hqq_err <= rtn_err * (1 + 1e-4) + 1e-9 * magnitude), f"{name}: a group's mean |error| exceeds mx.quantize's"
        assert hqq_err.mean() < 0.97 * rtn_err.mean(), f"{name}: hqq barely improved on mx.quantize ({hqq_err.mean()} vs {rtn_err.mean()})"
    assert len(src) >= 2


# ---------------------------------------------------------------------------------------------------------------
# 3. GGUF


def gguf_field(reader, key):
    field = reader.fields.get(key)
    assert field is not None, f"GGUF key {key} missing"
    return field.contents()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
def test_gguf_blocks_match_gguf_py(sources, tmp_path, gguf_type, dtype):
    import gguf
    from gguf import quants

    src_path, src = sources[dtype]
    out = tmp_path / "out.gguf"
    report = quantize(src_path, out, "--format", "gguf", "--gguf-type", gguf_type)
    qtype = gguf.GGMLQuantizationType[gguf_type]
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(src) and len(reader.tensors) == len(src), "GGUF tensor names differ"
    assert gguf_field(reader, "general.architecture") == "vit"
    assert gguf_field(reader, "general.quantization_version") == 2
    assert gguf_field(reader, "general.file_type") == gguf.LlamaFileType[f"MOSTLY_{gguf_type}"].value

    rb = readback(out, tmp_path)
    quantized = [n for n in src if groupable(n, src, 32)]
    assert quantized == [QKV, FC1]
    by_name = report_by_name(report)
    for name, w in src.items():
        t = tensors[name]
        assert tuple(int(d) for d in reversed(t.shape)) == w.shape, f"{name}: ggml dims {t.shape}"
        if name in quantized:
            assert t.tensor_type == qtype, f"{name}: {t.tensor_type.name}"
            want = quants.quantize(w.astype(np.float32), qtype)
            assert t.data.tobytes() == want.tobytes(), f"{name}: {gguf_type} blocks differ from gguf.quants.quantize"
            deq = quants.dequantize(t.data, qtype).reshape(w.shape)
            assert_same_array(rb[name], deq.astype(np.float32), name=f"{name} readback vs gguf.quants.dequantize")
            r = by_name[name]
            assert r["quantized"] and r["layout"] == gguf_type and r["group_size"] == 32
            assert r["bits"] == int(gguf_type[1])
            assert abs(r["sqnr_db"] - sqnr_db(w, rb[name])) <= 1e-3, (name, r["sqnr_db"])
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType[dtype], f"kept {name}: {t.tensor_type.name}"
            assert_same_array(np.asarray(t.data).reshape(w.shape), w, name=f"gguf kept {name}")
            assert_same_array(rb[name], w, name=f"gguf readback kept {name}")
            assert not by_name[name]["quantized"]
    assert "conv" in by_name[CONV]["kept"] and "100" in by_name[FC2]["kept"]
    # sizes: output_bytes is the tensors' data (padding excluded)
    assert report["output_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    assert report["output_bytes"] <= out.stat().st_size - int(reader.tensors[0].data_offset)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("gguf_type", list(GGUF_K_TYPES))
def test_gguf_k_quants(sources, tmp_path, gguf_type, dtype):
    """Q4_K/Q6_K: gguf-py reads and dequantizes the super-blocks to ckpt's values (the block bytes themselves are
    pinned against compiled ggml in the Swift tests: gguf-py has no K-quant encoder); a 128-wide row falls back."""
    import gguf
    from gguf import quants

    src_path, src = sources[dtype]
    out = tmp_path / "out.gguf"
    report = quantize(src_path, out, "--format", "gguf", "--gguf-type", gguf_type)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    rb = readback(out, tmp_path)
    by_name = report_by_name(report)
    k_type, fallback = gguf.GGMLQuantizationType[gguf_type], gguf.GGMLQuantizationType[GGUF_K_TYPES[gguf_type]]
    # FC1 is 256 wide: one super-block per row
    t = tensors[FC1]
    assert t.tensor_type == k_type, t.tensor_type.name
    w = src[FC1].astype(np.float32)
    deq = quants.dequantize(t.data, k_type).reshape(w.shape)
    assert_same_array(rb[FC1], deq.astype(np.float32), name=f"{FC1} readback vs gguf.quants.dequantize")
    assert by_name[FC1]["layout"] == gguf_type and by_name[FC1]["group_size"] == 256
    assert abs(by_name[FC1]["sqnr_db"] - sqnr_db(w, rb[FC1])) <= 1e-3
    # error bound per 256-value super-block: one step of its widest range (sub-block scales are themselves 6/8-bit
    # codes of the super-block's, so a tiny sub-block beside large ones may round to scale 0). Row 6 (x1e-4) is left
    # out: its super-block scale d = range/15/63 underflows F16, a limit of the format.
    steps = 15 if gguf_type == "Q4_K" else 63
    sup = np.delete(w, 6, axis=0)
    deq = np.delete(deq, 6, axis=0)
    span = np.abs(sup).max(1, keepdims=True) * 2
    err = np.abs(deq.reshape(-1, 256) - sup)
    assert (err <= span / steps + 1e-6).all(), float((err / (span / steps + 1e-12)).max())
    assert by_name[FC1]["sqnr_db"] > (18 if gguf_type == "Q4_K" else 30)
    # QKV is 128 wide: not whole super-blocks, so the fallback type, bit-identical to gguf-py's encoder
    t = tensors[QKV]
    assert t.tensor_type == fallback, t.tensor_type.name
    assert t.data.tobytes() == quants.quantize(src[QKV].astype(np.float32), fallback).tobytes()
    assert by_name[QKV]["layout"] == fallback.name and by_name[QKV]["group_size"] == 32
    assert "100" in by_name[FC2]["kept"]


@pytest.mark.parametrize("bits,implied", [(8, ("Q8_0", "Q8_0")), (6, ("Q8_0", "Q6_K")), (5, ("Q5_0", "Q5_0")),
                                          (4, ("Q4_0", "Q4_0"))])
def test_gguf_type_from_bits(sources, tmp_path, bits, implied):
    import gguf

    src_path, _ = sources["F32"]
    out = tmp_path / "out.gguf"
    quantize(src_path, out, "--format", "gguf", "--bits", bits)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert (types[QKV], types[FC1]) == implied


def test_gguf_from_folder(sources, tmp_path):
    """A Hugging Face folder: config.json's ViT hyper-parameters become vit.* keys; an F64 tensor is kept as F32."""
    import gguf

    _, src = sources["F16"]
    tensors = dict(src)
    tensors["blocks.0.ls1.gamma"] = np.linspace(0.5, 1.5, 32, dtype=np.float64)
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 64, "image_size": 16, "patch_size": 4, "layer_norm_eps": 1e-6}
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.gguf"
    quantize(folder, out, "--format", "gguf", "--gguf-type", "Q4_1")
    reader = gguf.GGUFReader(str(out))
    want = {"vit.embedding_length": 32, "vit.block_count": 1, "vit.attention.head_count": 2,
            "vit.feed_forward_length": 64, "vit.image_size": 16, "vit.patch_size": 4, "vit.model_type": "vit"}
    for key, value in want.items():
        assert gguf_field(reader, key) == value, key
    assert gguf_field(reader, "vit.attention.layer_norm_epsilon") == pytest.approx(1e-6, rel=1e-7)
    t = {t.name: t for t in reader.tensors}
    assert t["blocks.0.ls1.gamma"].tensor_type == gguf.GGMLQuantizationType.F32
    assert_same_array(np.asarray(t["blocks.0.ls1.gamma"].data), tensors["blocks.0.ls1.gamma"].astype(np.float32),
                      name="F64 kept as F32")
    assert t[QKV].tensor_type == gguf.GGMLQuantizationType.Q4_1
    assert t["pos_embed"].tensor_type == gguf.GGMLQuantizationType.F16


@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q5_1"])
def test_gguf_report_header_matches_blocks(sources, tmp_path, gguf_type):
    """The report's top-level bits and group_size describe what was written (--bits is implied by --gguf-type)."""
    src_path, _ = sources["F32"]
    report = quantize(src_path, tmp_path / "out.gguf", "--format", "gguf", "--gguf-type", gguf_type)
    per_tensor = {(t["bits"], t["group_size"]) for t in report["tensors"] if t["quantized"]}
    assert per_tensor == {(int(gguf_type[1]), 32)}
    assert (report["bits"], report["group_size"]) == (int(gguf_type[1]), 32), {
        k: v for k, v in report.items() if k != "tensors"}


def test_gguf_refuses_non_rtn_and_unknown_types(sources, tmp_path):
    src_path, _ = sources["F32"]
    for args in (["--method", "hqq"], ["--method", "mse"], ["--bits", "2"], ["--gguf-type", "Q3_K"], ["--gguf-type", "F16"]):
        out = tmp_path / "x.gguf"
        proc = quantize(src_path, out, "--format", "gguf", *args, check=64)
        assert proc.stderr.strip(), args
        assert not out.exists(), args


def test_gguf_keeps_f8_as_f32_and_refuses_unsigned(tmp_path):
    """Kept floats GGUF has no type for (F8 here, F64 likewise) are written as F32, exactly; a kept tensor of a
    dtype GGUF cannot hold (U8) is refused with the file and tensor named, and nothing is written."""
    import ml_dtypes
    from gguf import GGMLQuantizationType, GGUFReader

    rng = np.random.default_rng(5)
    src = {
        QKV: (rng.standard_normal((16, 64)) * 0.05).astype(np.float32),
        "blocks.0.norm1.bias": (rng.standard_normal(64) * 0.1).astype(np.float32).astype(ml_dtypes.float8_e5m2),
    }
    path = tmp_path / "f8.safetensors"
    save_file(src, str(path))
    out = tmp_path / "out.gguf"
    quantize(path, out, "--format", "gguf", "--gguf-type", "Q8_0")
    tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
    bias = tensors["blocks.0.norm1.bias"]
    assert bias.tensor_type == GGMLQuantizationType.F32
    assert_same_array(np.asarray(bias.data), src["blocks.0.norm1.bias"].astype(np.float32), name="F8 bias")

    bad = tmp_path / "u8.safetensors"
    save_file({**src, "blocks.0.mask": np.arange(8, dtype=np.uint8)}, str(bad))
    refused = tmp_path / "bad.gguf"
    proc = quantize(bad, refused, "--format", "gguf", "--gguf-type", "Q8_0", check=None)
    assert_refused(proc, 2, out=refused, names=(str(bad), "blocks.0.mask", "U8"))


def test_gguf_help_names_the_supported_types():
    """--help's list of --gguf-type values is the list the option accepts."""
    text = run_ckpt("quantize", "--help").stdout
    m = re.search(r"\n  --gguf-type <gguf-type>(.*?)(?=\n  --)", text, re.S)
    assert m, text
    named = set(re.findall(r"\bQ\d_[0-9K]\b", m.group(1)))
    supported = set(GGUF_TYPES) | set(GGUF_K_TYPES)
    assert named == supported, f"--help names {sorted(named)}; the writer supports {sorted(supported)}"


# ---------------------------------------------------------------------------------------------------------------
# 4. compressed-tensors


def ct_modules(state: dict) -> dict[str, dict]:
    """Per-module local state dicts of the quantized modules (those with weight_packed)."""
    modules = sorted(k[: -len(".weight_packed")] for k in state if k.endswith(".weight_packed"))
    return {m: {k[len(m) + 1 :]: v for k, v in state.items() if k.startswith(m + ".")} for m in modules}


def ct_reference(w: np.ndarray, bits: int, symmetric: bool, group: int | None):
    """compressed-tensors' own RTN (min-max qparams, quantize, pack_to_int32) of `w`, as fixtures/quant/generate.py."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group" if group else "channel",
                            group_size=group)
    t = torch.from_numpy(np.ascontiguousarray(w))
    g = group or w.shape[1]
    grouped = t.reshape(w.shape[0], -1, g)
    scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    q = ct_quantize(t, scale, zp, args, dtype=torch.int8)
    packed = pack_to_int32(q, bits).numpy()
    zp_packed = None if symmetric else pack_to_int32(zp.to(torch.int8), bits, packed_dim=0).numpy()
    return packed, scale.numpy(), zp_packed


CT_CASES = [(b, g, s) for s in (True, False) for b in (2, 3, 4, 8) for g in (32, 128, 0)]


def check_ct_folder(out: Path, src: dict, tmp_path: Path, *, bits: int, group: int, symmetric: bool, method: str,
                    exact_reference: bool):
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file as load_torch

    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(raw)
    assert raw["quant_method"] == "compressed-tensors" and raw["format"] == "pack-quantized"
    assert raw["quantization_status"] == "compressed" and isinstance(raw.get("version"), str) and raw["version"]
    assert list(qc.config_groups) == ["group_0"]
    scheme = qc.config_groups["group_0"]
    assert scheme.targets == ["Linear"]
    wargs = scheme.weights
    assert wargs.num_bits == bits and wargs.symmetric == symmetric and wargs.type == "int"
    assert wargs.strategy == ("group" if group else "channel")
    assert wargs.group_size == (group or None)
    assert wargs.observer == {"rtn": "memoryless_minmax", "mse": "mse", "hqq": "hqq"}[method]

    group_or_none = group or None
    quantized = [n for n in src if groupable(n, src, group_or_none)]
    kept_linear = [n[: -len(".weight")] for n in LINEARS if n not in quantized]
    assert sorted(raw["ignore"]) == sorted(kept_linear)

    state = load_torch(str(out / "model.safetensors"))
    modules = ct_modules(state)
    assert sorted(modules) == sorted(n[: -len(".weight")] for n in quantized)
    rb = readback(out, tmp_path)
    assert set(rb) == set(src)
    for module, local in modules.items():
        name = module + ".weight"
        w = src[name]
        rows, cols = w.shape
        groups = cols // group if group else 1
        expected_keys = {"weight_packed", "weight_scale", "weight_shape", "bias"} | ({"weight_zero_point"} if not symmetric else set())
        assert set(local) == expected_keys, (module, sorted(local))
        assert local["weight_shape"].dtype == torch.int64 and local["weight_shape"].tolist() == [rows, cols]
        assert local["weight_packed"].dtype == torch.int32
        assert tuple(local["weight_packed"].shape) == (rows, -(-cols * bits // 32))
        assert local["weight_scale"].dtype == {np.float32: torch.float32, np.float16: torch.float16}[w.dtype.type]
        assert tuple(local["weight_scale"].shape) == (rows, groups)
        if not symmetric:
            assert local["weight_zero_point"].dtype == torch.int32
            assert tuple(local["weight_zero_point"].shape) == (-(-rows * bits // 32), groups)

        decompressed = PackedQuantizationCompressor.decompress(dict(local), scheme)["weight"]
        assert rb[name].dtype == w.dtype
        assert_same_array(rb[name], decompressed.numpy(), name=f"{name} readback vs compressed-tensors")

        if exact_reference:
            packed, scale, zp = ct_reference(w, bits, symmetric, group_or_none)
            assert_same_array(local["weight_packed"].numpy(), packed, name=f"{name} weight_packed")
            assert_same_array(local["weight_scale"].numpy(), scale, name=f"{name} weight_scale")
            if not symmetric:
                assert_same_array(local["weight_zero_point"].numpy(), zp, name=f"{name} weight_zero_point")
    kept = [n for n in src if n not in quantized]
    assert_passthrough({k: v.numpy() for k, v in state.items() if k in kept}, src, kept, label="compressed-tensors")
    assert_passthrough(rb, src, kept, label="compressed-tensors readback")
    return rb


@pytest.mark.parametrize("bits,group,symmetric", CT_CASES,
                         ids=[f"b{b}-{'g' + str(g) if g else 'channel'}-{'sym' if s else 'asym'}" for b, g, s in CT_CASES])
def test_compressed_tensors_rtn(sources, tmp_path, bits, group, symmetric):
    src_path, src = sources["F32"]
    out = tmp_path / "ct"
    flags = ["--symmetric"] if symmetric else []
    report = quantize(src_path, out, "--format", "compressed-tensors", "--bits", bits, "--group-size", group, *flags)
    rb = check_ct_folder(out, src, tmp_path, bits=bits, group=group, symmetric=symmetric, method="rtn",
                         exact_reference=True)
    by_name = report_by_name(report)
    state = load_file(str(out / "model.safetensors"))
    for name in LINEARS:
        if groupable(name, src, group or None):
            module = name[: -len(".weight")]
            local = {k[len(module) + 1 :]: v for k, v in state.items() if k.startswith(module + ".weight_")}
            unrounded = ct_unrounded(local, bits)
            assert_same_array(rb[name], unrounded, name=f"{name}: readback vs (q - zero_point)*scale")
            check_reported_error(by_name[name], src[name], unrounded, rb[name], name=name)
    assert report["group_size"] == (group or None)
    for name in LINEARS:
        t = by_name[name]
        if groupable(name, src, group or None):
            assert t["quantized"] and t["bits"] == bits and t["group_size"] == (group or None), t
        else:
            assert not t["quantized"] and "100" in t["kept"], t


CT_OTHER = [("rtn", 4, 32, False, "F16"), ("rtn", 3, 0, True, "F16"), ("rtn", 8, 128, True, "F16"),
            ("mse", 4, 32, False, "F32"), ("mse", 3, 0, True, "F32"), ("hqq", 4, 32, False, "F32"),
            ("hqq", 2, 128, True, "F32"), ("hqq", 4, 0, False, "F16"), ("mse", 2, 32, True, "F16")]


@pytest.mark.parametrize("method,bits,group,symmetric,dtype", CT_OTHER)
def test_compressed_tensors_methods_and_f16(sources, tmp_path, method, bits, group, symmetric, dtype):
    """F16 inputs and the mse/hqq methods: compressed-tensors' decompressor reads ckpt's values back."""
    src_path, src = sources[dtype]
    out = tmp_path / "ct"
    flags = ["--symmetric"] if symmetric else []
    report = quantize(src_path, out, "--format", "compressed-tensors", "--bits", bits, "--group-size", group,
                      "--method", method, *flags)
    rb = check_ct_folder(out, src, tmp_path, bits=bits, group=group, symmetric=symmetric, method=method,
                         exact_reference=False)
    by_name = report_by_name(report)
    state = load_file(str(out / "model.safetensors"))
    for name in (QKV, FC1):
        module = name[: -len(".weight")]
        local = {k[len(module) + 1 :]: v for k, v in state.items() if k.startswith(module + ".weight_")}
        check_reported_error(by_name[name], src[name], ct_unrounded(local, bits), rb[name], name=name)


def test_compressed_tensors_f64_weights_get_f32_scales(sources, tmp_path):
    """An F64 checkpoint: its modules get F32 scales (compressed-tensors' own rule would give F16, rounding every
    scale to 11 bits); the decompressor reads them, equal to ckpt's readback and to the F32 input's quantization."""
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file as load_torch

    _, src32 = sources["F32"]
    src64 = {k: v.astype(np.float64) for k, v in src32.items()}
    path64 = tmp_path / "src-f64.safetensors"
    save_file(src64, str(path64))
    out64, out32 = tmp_path / "ct64", tmp_path / "ct32"
    quantize(path64, out64, "--format", "compressed-tensors", "--bits", 4, "--group-size", 32)
    quantize(sources["F32"][0], out32, "--format", "compressed-tensors", "--bits", 4, "--group-size", 32)
    qc = QuantizationConfig.model_validate(json.loads((out64 / "config.json").read_text())["quantization_config"])
    state64, state32 = load_torch(str(out64 / "model.safetensors")), load_torch(str(out32 / "model.safetensors"))
    rb = readback(out64, tmp_path)
    quantized = [n for n in LINEARS if groupable(n, src64, 32)]
    assert quantized
    for name in quantized:
        module = name[: -len(".weight")]
        local = {k[len(module) + 1 :]: v for k, v in state64.items() if k.startswith(module + ".weight_")}
        assert local["weight_scale"].dtype == torch.float32, (name, local["weight_scale"].dtype)
        for key, value in local.items():  # the F64 input quantizes exactly as its F32 values do
            assert torch.equal(value, state32[module + "." + key]), f"{name}: {key} differs from the F32 input's"
        decompressed = PackedQuantizationCompressor.decompress(dict(local), qc.config_groups["group_0"])["weight"]
        assert decompressed.dtype == torch.float32
        assert_same_array(rb[name].astype(np.float32), decompressed.numpy(), name=f"{name} readback vs compressed-tensors")
    kept = [n for n in src64 if n not in quantized]
    assert all(state64[n].dtype == torch.float64 for n in kept)
    assert_passthrough({k: v.numpy() for k, v in state64.items() if k in kept}, src64, kept, label="compressed-tensors F64")


def load_through_model_compressor(root, qc, model_file: Path) -> dict[str, np.ndarray]:
    """The whole-model path transformers takes: apply the config to the torch model `root` (its modules named as
    the checkpoint's tensors), compress it, load the state dict strictly, decompress; returns the state."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from safetensors.torch import load_file as load_torch

    apply_quantization_config(root, qc)
    compressor = ModelCompressor(quantization_config=qc)
    compressor.compress_model(root)
    root.load_state_dict(load_torch(str(model_file)), strict=True)
    compressor.decompress_model(root)
    return {k: v.detach().numpy() for k, v in root.state_dict().items()}


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (8, 0, True), (3, 128, False)])
def test_compressed_tensors_model_compressor(sources, tmp_path, bits, group, symmetric):
    """The whole-model path transformers takes: apply the config to a torch model whose modules carry the tensor
    names, compress, load ckpt's state dict (strict), decompress."""
    import torch
    from compressed_tensors.quantization import QuantizationConfig

    src_path, src = sources["F32"]
    out = tmp_path / "ct"
    flags = ["--symmetric"] if symmetric else []
    quantize(src_path, out, "--format", "compressed-tensors", "--bits", bits, "--group-size", group, *flags)
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])

    root = torch.nn.Module()

    def put(path: str, module: torch.nn.Module):
        parts, cur = path.split("."), root
        for p in parts[:-1]:
            if not hasattr(cur, p):
                cur.add_module(p, torch.nn.Module())
            cur = getattr(cur, p)
        cur.add_module(parts[-1], module)

    for name in LINEARS:
        out_dim, in_dim = src[name].shape
        put(name[: -len(".weight")], torch.nn.Linear(in_dim, out_dim))
    put("blocks.0.norm1", torch.nn.LayerNorm(32))
    put("patch_embed.proj", torch.nn.Conv2d(3, 32, 4, 4, bias=False))
    root.register_parameter("pos_embed", torch.nn.Parameter(torch.zeros(1, 17, 32)))
    root.register_parameter("cls_token", torch.nn.Parameter(torch.zeros(1, 1, 32)))

    state = load_through_model_compressor(root, qc, out / "model.safetensors")
    rb = readback(out, tmp_path)
    for name in src:
        assert name in state, f"{name} missing after decompress_model"
        if groupable(name, src, group or None):
            assert_same_array(rb[name], state[name], name=f"ModelCompressor {name}")
            assert not np.array_equal(state[name], src[name])
        else:
            assert_same_array(state[name], src[name], name=f"ModelCompressor kept {name}")


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 0)])
def test_compressed_tensors_symmetric_loads_in_transformers(tmp_path, bits, group):
    """The user's path: `ViTModel.from_pretrained` on ckpt's symmetric pack-quantized folder (transformers reads the
    quantization_config and decompresses through compressed-tensors). Its outputs equal, bit for bit, those of the
    same model loaded from ckpt's own dequantized readback, and differ from F32's. (Asymmetric folders, ckpt's and
    compressed-tensors' own alike, do not load in transformers 5.23: it expects unpacked zero points.)"""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       image_size=32, patch_size=8)
    ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "f32")
    report = quantize(tmp_path / "f32", tmp_path / "ct", "--format", "compressed-tensors", "--bits", bits,
                      "--group-size", group, "--symmetric")
    assert sum(t["quantized"] for t in report["tensors"]) == 12  # q, k, v, o, fc1, fc2 of both layers
    (tmp_path / "deq").mkdir()
    (tmp_path / "deq" / "config.json").write_bytes((tmp_path / "f32" / "config.json").read_bytes())
    run_ckpt("convert", tmp_path / "ct", tmp_path / "deq" / "model.safetensors", timeout=300)
    x = torch.randn(2, 3, 32, 32)
    outputs = {}
    for name in ("ct", "deq", "f32"):
        model = ViTModel.from_pretrained(tmp_path / name, add_pooling_layer=False).eval()
        with torch.no_grad():
            outputs[name] = model(x).last_hidden_state.numpy()
    assert_same_array(outputs["ct"], outputs["deq"], name="transformers-loaded vs ckpt readback")
    assert not np.allclose(outputs["ct"], outputs["f32"], atol=1e-3)


def test_compressed_tensors_ignore_lists_every_kept_linear(tmp_path):
    """`ignore` names every kept 2-D `*.weight` module, whatever its name (here MAE's decoder_embed, a Linear kept
    by --skip), and no mangled name for a parameter without a `.weight` suffix: the loader then quantizes exactly
    the modules ckpt packed, and strict loading of the state dict succeeds."""
    import torch
    from compressed_tensors.quantization import QuantizationConfig

    rng = np.random.default_rng(7)
    src = {
        "decoder_embed.weight": (rng.standard_normal((16, 64)) * 0.05).astype(np.float32),
        "decoder_embed.bias": np.zeros(16, np.float32),
        FC1: (rng.standard_normal((32, 64)) * 0.05).astype(np.float32),
        "attn.in_proj_weight": (rng.standard_normal((48, 64)) * 0.05).astype(np.float32),
    }
    path = tmp_path / "mae.safetensors"
    save_file(src, str(path))
    out = tmp_path / "ct"
    report = quantize(path, out, "--format", "compressed-tensors", "--bits", 4, "--group-size", 32, "--skip", "decoder")
    assert {t["name"] for t in report["tensors"] if t["quantized"]} == {FC1}
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted(config["ignore"]) == ["decoder_embed"]

    root = torch.nn.Module()
    root.add_module("decoder_embed", torch.nn.Linear(64, 16))
    mlp = torch.nn.Module()
    mlp.add_module("fc1", torch.nn.Linear(64, 32, bias=False))
    block = torch.nn.Module()
    block.add_module("mlp", mlp)
    root.add_module("blocks", torch.nn.ModuleList([block]))
    root.add_module("attn", torch.nn.Module())
    root.attn.register_parameter("in_proj_weight", torch.nn.Parameter(torch.zeros(48, 64)))
    qc = QuantizationConfig.model_validate(config)
    state = load_through_model_compressor(root, qc, out / "model.safetensors")
    for name in ("decoder_embed.weight", "attn.in_proj_weight"):
        assert_same_array(state[name], src[name], name=name)
    assert not np.array_equal(state[FC1], src[FC1])
    assert_same_array(state[FC1], readback(out, tmp_path)[FC1], name=FC1)


# ---------------------------------------------------------------------------------------------------------------
# 5. dequantized


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits,group,method", [(4, 64, "rtn"), (2, 32, "rtn"), (6, 128, "mse"), (3, 32, "hqq")])
def test_dequantized_equals_mlx_readback(sources, tmp_path, bits, group, method, dtype):
    src_path, src = sources[dtype]
    common = ["--bits", bits, "--group-size", group, "--method", method]
    deq_path = tmp_path / "deq.safetensors"
    report = quantize(src_path, deq_path, "--format", "dequantized", *common)
    assert deq_path.is_file()
    quantize(src_path, tmp_path / "mlx", "--format", "mlx", *common)
    deq = load_file(str(deq_path))
    via_mlx = readback(tmp_path / "mlx", tmp_path)
    assert set(deq) == set(src)
    for name, w in src.items():
        assert_same_array(deq[name], via_mlx[name], name=f"dequantized vs mlx readback {name}")
        assert deq[name].dtype == w.dtype
    quantized = {t["name"] for t in report["tensors"] if t["quantized"]}
    assert quantized == {QKV, FC1}  # conv: 48 columns, no group size divides it
    for name in src:
        if name not in quantized:
            assert_same_array(deq[name], src[name], name=f"dequantized kept {name}")
        else:
            assert not np.array_equal(deq[name], src[name])


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 0), (2, 128)])
def test_dequantized_symmetric_equals_compressed_tensors_readback(sources, tmp_path, bits, group):
    src_path, src = sources["F32"]
    common = ["--bits", bits, "--group-size", group, "--symmetric"]
    quantize(src_path, tmp_path / "deq.safetensors", "--format", "dequantized", *common)
    quantize(src_path, tmp_path / "ct", "--format", "compressed-tensors", *common)
    deq = load_file(str(tmp_path / "deq.safetensors"))
    via_ct = readback(tmp_path / "ct", tmp_path)
    for name in src:
        if name == CONV:
            continue  # dequantized output also quantizes convs when the group fits; compressed-tensors never does
        assert_same_array(deq[name], via_ct[name], name=f"dequantized vs compressed-tensors readback {name}")


def test_dequantized_per_channel_quantizes_conv(sources, tmp_path):
    """`dequantized` is the one format that quantizes convs (flattened to [out, in*kh*kw]); per channel, the
    affine RTN rule of formats/mlx.md applies to each output channel's 48 weights."""
    src_path, src = sources["F32"]
    out = tmp_path / "deq.safetensors"
    report = quantize(src_path, out, "--format", "dequantized", "--bits", 4, "--group-size", 0)
    by_name = report_by_name(report)
    assert by_name[CONV]["quantized"] and by_name[FC2]["quantized"], by_name[CONV]
    deq = load_file(str(out))
    for name in (CONV, FC2, QKV):
        w = src[name].reshape(src[name].shape[0], -1)
        q, scale, bias = affine_rtn(w, w.shape[1], 4)
        want = (q * scale + bias).astype(np.float32).reshape(src[name].shape)
        assert_same_array(deq[name], want, name=f"per-channel {name}")


def test_dequantized_folder_input_writes_folder(sources, tmp_path):
    src_path, src = sources["F16"]
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(src, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5]}))
    out = tmp_path / "deq"
    quantize(folder, out, "--format", "dequantized")
    assert out.is_dir()
    assert (out / "preprocessor_config.json").read_bytes() == (folder / "preprocessor_config.json").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "vit" and "quantization" not in config and "quantization_config" not in config
    deq = load_file(str(out / "model.safetensors"))
    assert {k: (v.dtype, v.shape) for k, v in deq.items()} == {k: (v.dtype, v.shape) for k, v in src.items()}

    mlx_out = tmp_path / "mlx"
    quantize(folder, mlx_out, "--format", "mlx")
    config = json.loads((mlx_out / "config.json").read_text())
    assert config["model_type"] == "vit" and config["hidden_size"] == 32
    assert config["quantization"] == {"bits": 4, "group_size": 64, "mode": "affine"}
    assert (mlx_out / "preprocessor_config.json").read_bytes() == (folder / "preprocessor_config.json").read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# 6. reading back through ckpt


READBACK_FORMATS = {
    "mlx": ("mlx", ["--format", "mlx", "--bits", "3", "--group-size", "32"]),
    "ct-asym": ("ct", ["--format", "compressed-tensors", "--bits", "4", "--group-size", "128"]),
    "ct-sym": ("ct", ["--format", "compressed-tensors", "--bits", "8", "--group-size", "0", "--symmetric"]),
    "gguf": ("out.gguf", ["--format", "gguf", "--gguf-type", "Q5_1"]),
}
# what `inspect --json` says of a quantized tensor: scheme, bits, group size, symmetric, stored tensor suffixes
READBACK_LAYOUTS = {
    "mlx": ("mlx-affine", 3, 32, False, ["weight", "scales", "biases"]),
    "ct-asym": ("compressed-tensors pack-quantized", 4, 128, False,
                ["weight_packed", "weight_scale", "weight_shape", "weight_zero_point"]),
    "ct-sym": ("compressed-tensors pack-quantized", 8, None, True, ["weight_packed", "weight_scale", "weight_shape"]),
    "gguf": ("Q5_1", 5, 32, False, ["weight"]),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("fmt", list(READBACK_FORMATS))
def test_inspect_and_diff_read_quantized_outputs(sources, tmp_path, fmt, dtype):
    src_path, src = sources[dtype]
    target, args = READBACK_FORMATS[fmt]
    out = tmp_path / target
    report = quantize(src_path, out, *args)
    quantized = {t["name"] for t in report["tensors"] if t["quantized"]}
    assert quantized >= {QKV, FC1}

    info = run_ckpt("inspect", out, "--json").stdout
    info = json.loads(info)
    tensors = {t["name"]: t for t in info["tensors"]}
    assert set(tensors) == set(src), sorted(tensors)
    for name, w in src.items():
        t = tensors[name]
        assert tuple(t["shape"]) == w.shape, (name, t)
        want_dtype = "F32" if fmt == "gguf" and name in quantized else dtype
        assert t["dtype"] == want_dtype, (name, t)
        assert t["bytes"] == w.size * np.dtype(np.float32 if want_dtype == "F32" else np.float16).itemsize
    assert info["total_params"] == sum(w.size for w in src.values())
    by_name = report_by_name(report)
    scheme, bits, group, symmetric, suffixes = READBACK_LAYOUTS[fmt]
    for name in src:
        q = tensors[name].get("quantization")
        if name not in quantized:
            assert q is None, (name, q)
            continue
        assert q is not None, f"inspect shows no quantization for {name}"
        module = name[: -len(".weight")]
        cols = src[name].shape[1]
        # one group spanning the whole row is the same layout as one scale per channel
        groups_ok = (group,) if group is None or cols > group else (group, None)
        assert (q["scheme"], q["bits"], q["symmetric"]) == (scheme, bits, symmetric) and q["group_size"] in groups_ok, q
        assert q["stored_tensors"] == [f"{module}.{suffix}" for suffix in suffixes], q
        assert q["stored_bytes"] == by_name[name]["output_bytes"], (q, by_name[name])
    assert info["stored_bytes"] == report["output_bytes"]
    assert info["total_bytes"] == sum(t["bytes"] for t in info["tensors"])
    if fmt == "mlx":
        assert info["metadata"].get("format") == "mlx"
    if fmt == "gguf":
        assert info["format"] == "gguf"

    proc = run_ckpt("diff", src_path, out, "--json", check=1)
    diff = {t["name"]: t for t in json.loads(proc.stdout)["tensors"]}
    assert set(diff) == set(src)
    for name in src:
        d = diff[name]
        assert d["dtype_a"] == dtype
        if name in quantized:
            # diff and the report both measure the file's values (rounded to F16 for F16 weights)
            assert abs(d["sqnr_db"] - by_name[name]["sqnr_db"]) <= 1e-3, (name, d["sqnr_db"], by_name[name]["sqnr_db"])
            assert not d["equal"]
        else:
            assert d["equal"] and d["max_abs_error"] == 0, (name, d)


# ---------------------------------------------------------------------------------------------------------------
# 7. errors


def assert_refused(proc, code: int, *, out: Path | None = None, names: tuple[str, ...] = ()):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.strip(), "no message on stderr"
    for n in names:
        assert n in proc.stderr, f"stderr does not name {n}: {proc.stderr!r}"
    if out is not None:
        assert not out.exists(), f"{out} was left behind"
        assert temp_leftovers(out.parent) == []


@pytest.mark.parametrize("fmt,target", [("mlx", "mlx"), ("compressed-tensors", "ct"), ("gguf", "out.gguf"),
                                        ("dequantized", "deq.safetensors")])
def test_nan_weight_is_refused(tmp_path, fmt, target):
    tensors = synthetic_tensors()
    tensors[FC1] = tensors[FC1].copy()
    tensors[FC1][3, 7] = np.nan
    tensors["blocks.0.norm1.bias"] = tensors["blocks.0.norm1.bias"].copy()
    src = tmp_path / "nan.safetensors"
    save_file(tensors, str(src))
    before = src.read_bytes()
    out = tmp_path / target
    group = [] if fmt == "gguf" else ["--group-size", "32"]  # ggml blocks fix their own group
    proc = quantize(src, out, "--format", fmt, *group, check=None)
    assert_refused(proc, 2, out=out, names=(FC1,))
    assert "nan" in proc.stderr.lower()
    assert src.read_bytes() == before

    # a NaN outside the selection does not matter
    ok = tmp_path / ("ok-" + target)
    quantize(src, ok, "--format", fmt, *group, "--skip", "fc1")
    assert ok.exists()


@pytest.mark.parametrize("args", [
    ["--format", "mlx", "--bits", "7"],
    ["--format", "mlx", "--bits", "1"],
    ["--format", "compressed-tensors", "--bits", "16"],
    ["--format", "mlx", "--group-size", "48"],
    ["--format", "compressed-tensors", "--group-size", "256"],
    ["--format", "mlx", "--symmetric"],
    ["--format", "mlx", "--group-size", "0"],
    ["--format", "tflite"],
    ["--format", "mlx", "--method", "gptq"],
    ["--bits", "4"],  # --format is required
    ["--format", "gguf", "--symmetric"],  # the block type fixes the grid
    ["--format", "gguf", "--group-size", "64"],  # and the group
    ["--format", "gguf", "--gguf-type", "Q4_1", "--group-size", "32"],
    ["--format", "mlx", "--gguf-type", "Q8_0"],  # a GGUF option without GGUF output
    ["--format", "compressed-tensors", "--gguf-type", "Q4_0"],
], ids=lambda a: " ".join(a))
def test_usage_errors(sources, tmp_path, args):
    src_path, _ = sources["F32"]
    out = tmp_path / "out"
    proc = run_ckpt("quantize", src_path, out, *args, check=None)
    assert_refused(proc, 64, out=out)


@pytest.mark.parametrize("flag", ["--only", "--skip"])
def test_bad_regex(sources, tmp_path, flag):
    src_path, _ = sources["F32"]
    out = tmp_path / "mlx"
    proc = quantize(src_path, out, "--format", "mlx", flag, "attn.(qkv", check=None)
    assert proc.returncode in (2, 64), (proc.returncode, proc.stderr)
    assert flag in proc.stderr and "attn.(qkv" in proc.stderr, proc.stderr
    assert not out.exists()


def test_output_equal_to_input_is_refused(sources, tmp_path):
    _, src = sources["F32"]
    path = tmp_path / "model.safetensors"
    save_file(src, str(path))
    before = path.read_bytes()
    proc = run_ckpt("quantize", path, path, "--format", "dequantized", check=None)
    assert_refused(proc, 64)
    # the same file under another spelling: refused too (ckpt never overwrites its input)
    proc = run_ckpt("quantize", path, f"{tmp_path}/./model.safetensors", "--format", "dequantized", check=None)
    assert_refused(proc, 2)
    assert "overwrite an input" in proc.stderr, proc.stderr
    assert path.read_bytes() == before
    # a folder output that is the input folder
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(src, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    before = (folder / "model.safetensors").read_bytes()
    assert_refused(run_ckpt("quantize", folder, folder, "--format", "mlx", check=None), 64)
    proc = run_ckpt("quantize", folder, str(folder) + "/", "--format", "mlx", check=None)
    assert_refused(proc, 2, names=("output folder is the input folder",))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("fmt", ["mlx", "compressed-tensors", "dequantized"])
def test_input_folder_config_is_never_overwritten(sources, tmp_path, fmt):
    """A folder whose weights are not called model.safetensors, written into under another spelling: its
    config.json and preprocessor_config.json are inputs too, so the run is refused and nothing changes."""
    _, src = sources["F32"]
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(src, str(folder / "weights.safetensors"))
    (folder / "config.json").write_text('{"model_type": "vit"}')
    (folder / "preprocessor_config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for target in (f"{folder}/", f"{tmp_path}/./hf/../hf"):
        proc = run_ckpt("quantize", folder, target, "--format", fmt, "--group-size", "32", check=None)
        assert_refused(proc, 2, names=("output folder is the input folder",))
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_output_folder_with_other_weights_is_refused(sources, tmp_path):
    """Shards or other weights already in the output folder would make it unreadable beside the new
    model.safetensors: refused, naming them; a model.safetensors there is simply replaced."""
    src_path, src = sources["F32"]
    out = tmp_path / "out"
    out.mkdir()
    shard = out / "model-00001-of-00002.safetensors"
    save_file({"x": np.zeros(4, np.float32)}, str(shard))
    proc = quantize(src_path, out, "--format", "mlx", "--group-size", "32", check=None)
    assert_refused(proc, 2, names=(str(out), shard.name))
    assert sorted(p.name for p in out.iterdir()) == [shard.name]
    shard.rename(out / "model.safetensors")
    quantize(src_path, out, "--format", "mlx", "--group-size", "32")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert set(readback(out, tmp_path)) == set(src)


@pytest.mark.parametrize("fmt,target,dtype,extra,scheme", [
    ("compressed-tensors", "ct", np.float16, 65504.0, "F16 scales"),  # (q - zp) * scale overflows F16
    ("mlx", "mlx", np.float32, 2e38, "F32 scales"),  # max - min overflows F32
    ("dequantized", "deq.safetensors", np.float32, 2e38, "F32 scales"),
    ("gguf", "out.gguf", np.float32, 1e8, "Q8_0"),  # the F16 block scale (|w|max / 127) overflows
], ids=lambda v: v if isinstance(v, str) else None)
def test_unrepresentable_range_is_refused(tmp_path, fmt, target, dtype, extra, scheme):
    """Finite weights whose range the format cannot hold would dequantize to Inf/NaN: refused with the tensor,
    the row and the scheme named, exit 2, nothing written (it used to write such files with exit 0)."""
    tensors = synthetic_tensors(dtype)
    tensors[FC1] = tensors[FC1].copy()
    tensors[FC1][5, :2] = [extra, -extra]
    src = tmp_path / "wide.safetensors"
    save_file(tensors, str(src))
    out = tmp_path / target
    group = ["--gguf-type", "Q8_0"] if fmt == "gguf" else ["--group-size", "32"]
    proc = quantize(src, out, "--format", fmt, *group, check=None)
    assert_refused(proc, 2, out=out, names=(str(src), FC1, scheme, "[overflow]"))
    # the same values in a kept tensor, or a range the format holds, pass
    quantize(src, tmp_path / ("skip-" + target), "--format", fmt, *group, "--skip", "fc1")
    tensors[FC1][5, :2] = [extra / 2**20, -extra / 2**20]
    save_file(tensors, str(src))
    report = quantize(src, tmp_path / ("ok-" + target), "--format", fmt, *group)
    assert all(t["sqnr_db"] is not None and t["max_error"] is not None for t in report["tensors"] if t["quantized"])


def test_dequantized_f8_weights_become_f32(tmp_path):
    """F8 weights in --format dequantized: the grid values are not F8 values, so they are written as F32, equal to
    quantizing the same weights given as F32 (this used to crash with SIGILL and leave a temp file)."""
    import ml_dtypes

    tensors = synthetic_tensors()
    f8 = {k: (v.astype(ml_dtypes.float8_e4m3fn) if k in (QKV, FC1) else v) for k, v in tensors.items()}
    widened = {k: v.astype(np.float32) if k in (QKV, FC1) else v for k, v in f8.items()}
    src8, src32 = tmp_path / "f8.safetensors", tmp_path / "f32.safetensors"
    save_file(f8, str(src8))
    save_file(widened, str(src32))
    out8, out32 = tmp_path / "deq8.safetensors", tmp_path / "deq32.safetensors"
    quantize(src8, out8, "--format", "dequantized", "--group-size", "32")
    quantize(src32, out32, "--format", "dequantized", "--group-size", "32")
    got, want = load_file(str(out8)), load_file(str(out32))
    for name in (QKV, FC1):
        assert got[name].dtype == np.float32, got[name].dtype
        assert_same_array(got[name], want[name], name=name)
    assert temp_leftovers(tmp_path) == []


def test_mlx_keeps_f64_and_f8_as_f32(tmp_path):
    """mlx.load has no F64 ("unsupported dtype F64") and reads F8 as raw uint8: an MLX folder keeps such floats as
    F32, exactly, and mlx loads it; an F64 Linear gets F32 scales and biases."""
    import ml_dtypes
    import mlx.core as mx

    rng = np.random.default_rng(11)
    src = {
        FC1: (rng.standard_normal((32, 64)) * 0.05).astype(np.float64),
        "blocks.0.norm1.weight": (1 + rng.standard_normal(64) * 0.1).astype(np.float64),
        "blocks.0.norm1.bias": (rng.standard_normal(64) * 0.1).astype(np.float32).astype(ml_dtypes.float8_e4m3fn),
    }
    path = tmp_path / "f64.safetensors"
    save_file(src, str(path))
    out = tmp_path / "mlx"
    report = quantize(path, out, "--format", "mlx", "--bits", 4, "--group-size", 32)
    loaded = mx.load(str(out / "model.safetensors"))
    kept = {t["name"]: t for t in report["tensors"] if not t["quantized"]}
    for name in ("blocks.0.norm1.weight", "blocks.0.norm1.bias"):
        assert loaded[name].dtype == mx.float32, (name, loaded[name].dtype)
        assert_same_array(np.array(loaded[name]), src[name].astype(np.float32), name=name)
        assert kept[name]["output_bytes"] == 4 * src[name].size
    module = FC1[: -len(".weight")]
    assert loaded[module + ".scales"].dtype == mx.float32 and loaded[module + ".biases"].dtype == mx.float32
    w_hat = mx.dequantize(loaded[FC1], loaded[module + ".scales"], loaded[module + ".biases"], group_size=32, bits=4)
    assert_same_array(np.array(w_hat), readback(out, tmp_path)[FC1].astype(np.float32), name=FC1)


def _mlx_folder(src_path, tmp_path, *args) -> Path:
    out = tmp_path / "mlx"
    quantize(src_path, out, "--format", "mlx", *args)
    return out


def test_corrupt_mlx_scales_shape(sources, tmp_path):
    src_path, _ = sources["F32"]
    out = _mlx_folder(src_path, tmp_path, "--bits", "4", "--group-size", "32")
    state = load_file(str(out / "model.safetensors"))
    module = QKV[: -len(".weight")]
    state[module + ".scales"] = np.ascontiguousarray(state[module + ".scales"][:, :-1])
    state[module + ".biases"] = np.ascontiguousarray(state[module + ".biases"][:, :-1])
    save_file(state, str(out / "model.safetensors"), metadata={"format": "mlx"})
    proc = run_ckpt("inspect", out, "--json", check=None)
    assert_refused(proc, 2, names=(QKV,))
    assert proc.stdout == ""
    # scales and biases of different shapes
    state = load_file(str(out / "model.safetensors"))
    state[module + ".biases"] = np.zeros((96, 4), np.float32)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "mlx"})
    assert_refused(run_ckpt("convert", out, tmp_path / "x.safetensors", check=None), 2, names=(QKV,),
                   out=tmp_path / "x.safetensors")


def _header_only_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A safetensors file of zero-element tensors (dtype, shape) with no data: shapes no array library builds."""
    header = {name: {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]} for name, (dtype, shape) in tensors.items()}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


@pytest.mark.parametrize("layout", ["mlx", "mlx-no-config", "mlx-scale-columns", "ct"])
def test_quantized_layouts_with_huge_zero_row_shapes(tmp_path, layout):
    """Zero rows carry no data, so a 200-byte file can declare rows of 2^59 packed words; counting their columns
    overflowed and trapped (SIGILL). Now an `overflow` error naming the tensor, and nothing written: the shape rule
    (non-zero dimensions span at most 2^56) refuses the first such tensor when the file is read, so with 2^62 scale
    columns it is `l.scales` that is named."""
    folder = tmp_path / layout
    folder.mkdir()
    if layout.startswith("mlx"):
        scale_columns = 2 ** 62 if layout == "mlx-scale-columns" else 2 ** 58
        packed_columns = 8 if layout == "mlx-scale-columns" else 2 ** 59
        _header_only_safetensors(folder / "model.safetensors", {
            "l.weight": ("U32", [0, packed_columns]), "l.scales": ("F32", [0, scale_columns]), "l.biases": ("F32", [0, scale_columns])})
        if layout == "mlx":
            (folder / "config.json").write_text(json.dumps({"quantization": {"bits": 4, "group_size": 64}}))
        name = "l.scales" if layout == "mlx-scale-columns" else "l.weight"
    else:
        # weight_shape [0, 2^62] is the file's only data
        header = {"l.weight_packed": {"dtype": "I32", "shape": [0, 2 ** 58], "data_offsets": [0, 0]},
                  "l.weight_scale": {"dtype": "F32", "shape": [0, 1], "data_offsets": [0, 0]},
                  "l.weight_shape": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + struct.pack("<qq", 0, 2 ** 62))
        name = "l.weight_packed"
    for command in (["inspect", folder], ["diff", folder, folder], ["convert", folder, tmp_path / "x.safetensors"]):
        proc = run_ckpt(*command, check=None)
        assert_refused(proc, 2, names=(name,), out=tmp_path / "x.safetensors")
        assert "[overflow]" in proc.stderr, proc.stderr


def test_mlx_incomplete_modules_are_refused(sources, tmp_path):
    """A packed uint32 weight with only one of .scales/.biases (MLX's mxfp4 mode stores no biases) used to pass
    through as raw codes with exit 0; so did .scales + .biases beside a weight that is not uint32. Both are errors
    naming the module now, and nothing is written."""
    src_path, _ = sources["F32"]
    out = _mlx_folder(src_path, tmp_path, "--bits", "4", "--group-size", "64")
    original = load_file(str(out / "model.safetensors"))
    module = FC1[: -len(".weight")]
    cases = {
        "no biases": ({k: v for k, v in original.items() if k != module + ".biases"}, module + ".biases"),
        "no scales": ({k: v for k, v in original.items() if k != module + ".scales"}, module + ".scales"),
        "int32 weight": ({**original, FC1: original[FC1].view(np.int32)}, FC1),
        "no weight": ({k: v for k, v in original.items() if k != FC1}, FC1),
    }
    for label, (state, named) in cases.items():
        save_file(state, str(out / "model.safetensors"), metadata={"format": "mlx"})
        for command in (["inspect", out, "--json"], ["convert", out, tmp_path / "x.safetensors"]):
            proc = run_ckpt(*command, check=None)
            assert_refused(proc, 2, names=(named,), out=tmp_path / "x.safetensors")
            assert proc.stdout == "", (label, proc.stdout)
    # without config.json's quantization block, a float weight beside .scales/.biases is a plain tensor
    (out / "config.json").unlink()
    save_file({FC1: np.ones((4, 8), np.float32), module + ".scales": np.ones((4, 1), np.float32),
               module + ".biases": np.zeros((4, 1), np.float32)}, str(out / "model.safetensors"))
    assert set(readback(out, tmp_path)) == {FC1, module + ".scales", module + ".biases"}


def test_packed_module_and_plain_tensor_of_one_name(sources, tmp_path):
    """`m.weight_packed` dequantizes to `m.weight`: a plain `m.weight` beside it made inspect list the name twice
    and diff call a file different from itself. Refused at open, naming the input. Names that differ only by
    Unicode normalisation are different tensors (bytes decide), not one module's parts."""
    src_path, _ = sources["F32"]
    out = tmp_path / "ct"
    quantize(src_path, out, "--format", "compressed-tensors", "--group-size", "32")
    state = load_file(str(out / "model.safetensors"))
    save_file({**state, FC1: np.ones((4, 4), np.float32)}, str(out / "model.safetensors"))
    for command in (["inspect", out], ["diff", out, out], ["convert", out, tmp_path / "x.safetensors"]):
        proc = run_ckpt(*command, check=None)
        assert_refused(proc, 2, names=(FC1, str(out / "model.safetensors")), out=tmp_path / "x.safetensors")
        assert "[duplicateName]" in proc.stderr, proc.stderr
    # MLX: "café" (NFC) quantized, "cafe\u0301" (NFD) a plain F32 tensor; each keeps its own values
    import mlx.core as mx
    w = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)
    q, scales, biases = mx.quantize(mx.array(w), group_size=64, bits=4)
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    plain = np.arange(12, dtype=np.float32).reshape(3, 4)
    folder = tmp_path / "nfc"
    folder.mkdir()
    save_file({nfc + ".weight": np.array(q), nfc + ".scales": np.array(scales), nfc + ".biases": np.array(biases),
               nfd + ".weight": plain}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"quantization": {"bits": 4, "group_size": 64}}))
    got = readback(folder, tmp_path)
    assert set(got) == {nfc + ".weight", nfd + ".weight"}
    assert_same_array(got[nfc + ".weight"], np.array(mx.dequantize(q, scales, biases, group_size=64, bits=4)), name=nfc)
    assert_same_array(got[nfd + ".weight"], plain, name=nfd)


def test_mlx_module_overrides_compare_names_byte_for_byte(tmp_path):
    """config.json's per-module entry is looked up byte for byte, as Python's dict does: with "café" (NFC)
    overridden to 8-bit g32, "cafe\u0301" (NFD) keeps the 4-bit g64 default. Both pairs give the same tensor shapes,
    so the NFD module used to decode silently as 8-bit g32."""
    import mlx.core as mx
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    rng = np.random.default_rng(11)
    w8, w4 = rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal((4, 128)).astype(np.float32)
    q8, s8, b8 = mx.quantize(mx.array(w8), group_size=32, bits=8)
    q4, s4, b4 = mx.quantize(mx.array(w4), group_size=64, bits=4)
    assert q8.shape == q4.shape and s8.shape == s4.shape  # only the config can tell them apart
    folder = tmp_path / "mlx"
    folder.mkdir()
    save_file({nfc + ".weight": np.array(q8), nfc + ".scales": np.array(s8), nfc + ".biases": np.array(b8),
               nfd + ".weight": np.array(q4), nfd + ".scales": np.array(s4), nfd + ".biases": np.array(b4)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"quantization": {"bits": 4, "group_size": 64, nfc: {"bits": 8, "group_size": 32}}}))
    got = readback(folder, tmp_path)
    assert_same_array(got[nfc + ".weight"], np.array(mx.dequantize(q8, s8, b8, group_size=32, bits=8)), name=nfc)
    assert_same_array(got[nfd + ".weight"], np.array(mx.dequantize(q4, s4, b4, group_size=64, bits=4)), name=nfd)


def _safetensors_with_data(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file from raw (dtype, shape, bytes): dtypes numpy cannot hold, such as F8_E4M3."""
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(data for _, _, data in tensors.values()))


@pytest.mark.parametrize("layout", ["mlx", "ct"])
def test_f8_scales_are_refused(tmp_path, layout):
    """The scales' dtype is the decoded weight's, and ckpt writes no F8: F8_E4M3 scales trapped (SIGILL) in the
    F32 → F8 conversion and left a temp file behind. Now an error naming the tensor, and nothing written."""
    folder = tmp_path / layout
    folder.mkdir()
    one_f8 = bytes([0x38])  # 1.0 in E4M3
    if layout == "mlx":
        _safetensors_with_data(folder / "model.safetensors", {
            "m.weight": ("U32", [1, 4], bytes(16)), "m.scales": ("F8_E4M3", [1, 1], one_f8), "m.biases": ("F8_E4M3", [1, 1], one_f8)})
        (folder / "config.json").write_text(json.dumps({"quantization": {"bits": 4, "group_size": 32}}))
        name = "m.weight"
    else:
        _safetensors_with_data(folder / "model.safetensors", {
            "m.weight_packed": ("I32", [1, 4], bytes(16)), "m.weight_scale": ("F8_E4M3", [1, 1], one_f8),
            "m.weight_shape": ("I64", [2], struct.pack("<qq", 1, 32))})
        name = "m.weight_packed"
    for command in (["inspect", folder], ["diff", folder, folder], ["convert", folder, tmp_path / "x.safetensors"]):
        proc = run_ckpt(*command, check=None)
        assert_refused(proc, 2, names=(name, str(folder / "model.safetensors")), out=tmp_path / "x.safetensors")
        assert "F8_E4M3" in proc.stderr, proc.stderr


def test_compressed_tensors_config_must_match_the_tensors(sources, tmp_path):
    """config.json's declared group size, strategy and symmetry are checked against the tensors (compressed-tensors'
    own decompressor fails on a group size that disagrees); activation-order groups (weight_g_idx) are refused
    rather than decoded as contiguous groups; with several config groups the one whose targets match the module
    (name, `re:` pattern, then the class `Linear`) is the one checked."""
    src_path, _ = sources["F32"]
    out = tmp_path / "ct"
    quantize(src_path, out, "--format", "compressed-tensors", "--group-size", "32")
    config = json.loads((out / "config.json").read_text())
    state = load_file(str(out / "model.safetensors"))
    module = FC1[: -len(".weight")]
    group = config["quantization_config"]["config_groups"]["group_0"]

    def with_weights(**changes):
        return {**config, "quantization_config": {**config["quantization_config"], "config_groups": {
            "group_0": {**group, "weights": {**group["weights"], **changes}}}}}

    def refused(new_config, new_state=None, *, says, module_named=".weight_packed"):
        """A config-wide change fails on the first module (any name ending in .weight_packed)."""
        (out / "config.json").write_text(json.dumps(new_config))
        save_file(new_state if new_state is not None else state, str(out / "model.safetensors"))
        for command in (["inspect", out], ["convert", out, tmp_path / "x.safetensors"]):
            proc = run_ckpt(*command, check=None)
            assert_refused(proc, 2, names=(module_named, str(out / "model.safetensors")), out=tmp_path / "x.safetensors")
            assert says in proc.stderr, (says, proc.stderr)

    refused(with_weights(group_size=64), says="groups of 64")
    refused(with_weights(strategy="channel", group_size=None), says="per-channel")
    refused(with_weights(symmetric=True), says="symmetric")  # zero points present, config says symmetric
    refused(with_weights(actorder="group"), says="weight_g_idx")
    refused(with_weights(type="float"), says="type 'float'")  # FP8/FP4 codes: decoding them as ints is wrong
    refused(with_weights(num_bits="4"), says="num_bits")
    refused(config, {**state, module + ".weight_g_idx": np.zeros(state[module + ".weight_shape"][1], np.int32)}, says="weight_g_idx",
            module_named=module)
    # several groups: an asymmetric one for Linear, a symmetric one for some other module by pattern; the module
    # without its zero point is still caught through the Linear group
    groups = {"group_0": group, "group_1": {**group, "targets": ["re:.*nothing_here$"], "weights": {**group["weights"], "symmetric": True}}}
    two = {**config, "quantization_config": {**config["quantization_config"], "config_groups": groups}}
    no_zero = {k: v for k, v in state.items() if k != module + ".weight_zero_point"}
    refused(two, no_zero, says="weight_zero_point", module_named=module)
    # and the file as written reads back
    (out / "config.json").write_text(json.dumps(two))
    save_file(state, str(out / "model.safetensors"))
    assert run_ckpt("inspect", out).returncode == 0


def test_mlx_config_errors(sources, tmp_path):
    src_path, _ = sources["F32"]
    out = _mlx_folder(src_path, tmp_path, "--bits", "4", "--group-size", "64")
    config = json.loads((out / "config.json").read_text())
    # no config.json: 4-bit g64 is also 2-bit g128 and 8-bit g32 by the shapes alone
    (out / "config.json").unlink()
    proc = run_ckpt("inspect", out, "--json", check=None)
    assert_refused(proc, 2)
    assert "config.json" in proc.stderr and ("qkv" in proc.stderr or "fc1" in proc.stderr), proc.stderr
    # a mode other than affine
    (out / "config.json").write_text(json.dumps({**config, "quantization": {**config["quantization"], "mode": "mxfp4"}}))
    proc = run_ckpt("inspect", out, "--json", check=None)
    assert_refused(proc, 2)
    assert "mxfp4" in proc.stderr
    # bits the layout does not support
    (out / "config.json").write_text(json.dumps({"quantization": {"bits": 7, "group_size": 64}}))
    assert_refused(run_ckpt("inspect", out, "--json", check=None), 2)
    # a config that contradicts the shapes (8-bit g64 cannot give these word counts)
    (out / "config.json").write_text(json.dumps({"quantization": {"bits": 8, "group_size": 64}}))
    assert_refused(run_ckpt("inspect", out, "--json", check=None), 2)


def test_compressed_tensors_missing_zero_point(sources, tmp_path):
    """An asymmetric config whose zero points are gone is an error naming the module (it used to decode as
    symmetric, 13 dB worse); compressed-tensors' own decompressor also fails on it. A symmetric file needs none."""
    src_path, _ = sources["F32"]
    out = tmp_path / "ct"
    quantize(src_path, out, "--format", "compressed-tensors", "--group-size", "32")
    state = load_file(str(out / "model.safetensors"))
    module = FC1[: -len(".weight")]
    del state[module + ".weight_zero_point"]
    save_file(state, str(out / "model.safetensors"))
    for command in (["inspect", out], ["diff", src_path, out]):
        proc = run_ckpt(*command, check=None)
        assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
        assert "asymmetric" in proc.stderr and module + ".weight_zero_point" in proc.stderr, proc.stderr
    sym = tmp_path / "sym"
    quantize(src_path, sym, "--format", "compressed-tensors", "--group-size", "32", "--symmetric")
    assert run_ckpt("inspect", sym).returncode == 0


def test_mlx_without_config_unambiguous_shapes(sources, tmp_path):
    """3-bit g32 is the only (bits, group) the shapes allow: read back without config.json, same values."""
    src_path, _ = sources["F32"]
    out = _mlx_folder(src_path, tmp_path, "--bits", "3", "--group-size", "32")
    with_config = readback(out, tmp_path, "with")
    (out / "config.json").unlink()
    without = readback(out, tmp_path, "without")
    assert set(with_config) == set(without)
    for name in with_config:
        assert_same_array(without[name], with_config[name], name=name)


# ---------------------------------------------------------------------------------------------------------------
# 8. selection and report


@pytest.mark.parametrize("flags,want", [
    (["--only", "attn"], {QKV}),
    (["--only", "qkv"], {QKV}),  # unanchored: matches inside the name
    (["--only", r"fc\d"], {FC1}),  # fc2 has 100 columns
    (["--skip", "fc1"], {QKV}),
    (["--only", "blocks", "--skip", "attn"], {FC1}),
], ids=lambda f: " ".join(f) if isinstance(f, list) else None)
def test_only_skip(sources, tmp_path, flags, want):
    src_path, src = sources["F32"]
    out = tmp_path / "mlx"
    report = quantize(src_path, out, "--format", "mlx", "--group-size", "32", *flags)
    by_name = report_by_name(report)
    assert {n for n, t in by_name.items() if t["quantized"]} == want
    state = load_file(str(out / "model.safetensors"))
    assert {n[: -len(".scales")] + ".weight" for n in state if n.endswith(".scales")} == want
    for name in (QKV, FC1):
        if name in want:
            continue
        reason = by_name[name]["kept"]
        if "--only" in flags and not re.search(flags[flags.index("--only") + 1], name):
            assert "--only" in reason, reason
        else:
            assert "--skip" in reason, reason
        assert_same_array(state[name], src[name], name=name)


def test_word_boundaries_are_greps(sources, tmp_path):
    """`\\b` in --only/--skip is grep's ASCII word boundary: `attn.qkv.weight` holds the word `qkv` (Swift's default
    Unicode boundaries would see one word and match nothing)."""
    src_path, _ = sources["F32"]
    report = quantize(src_path, tmp_path / "a", "--format", "mlx", "--group-size", "32", "--only", r"\bqkv\b")
    assert {t["name"] for t in report["tensors"] if t["quantized"]} == {QKV}
    report = quantize(src_path, tmp_path / "b", "--format", "mlx", "--group-size", "32", "--skip", r"\bqkv\b")
    assert {t["name"] for t in report["tensors"] if t["quantized"]} == {FC1}


def test_embedding_tables_and_linears_near_them(tmp_path):
    """Embedding tables are recognised by their module's own name and kept; Linears named near them (MAE's
    decoder_embed, Mixer's mlp_tokens.fc1, a positional_proj) and Conv1d/Conv3d weights are quantized."""
    rng = np.random.default_rng(5)
    linears = ["decoder_embed.weight", "blocks.0.mlp_tokens.fc1.weight", "attn.positional_proj.weight", "head.weight"]
    tables = ["embeddings.word_embeddings.weight", "model.embed_tokens.weight", "embeddings.position_embedding.weight",
              "wte.weight", "pos_embed.weight"]
    convs = ["audio.conv1.weight", "video.patch_embed.proj.weight"]
    tensors = {n: rng.standard_normal((16, 64)).astype(np.float32) for n in linears + tables}
    tensors[convs[0]] = rng.standard_normal((16, 8, 4)).astype(np.float32)  # Conv1d [out, in, k]
    tensors[convs[1]] = rng.standard_normal((16, 2, 2, 4, 4)).astype(np.float32)  # Conv3d
    src = tmp_path / "mixed.safetensors"
    save_file(tensors, str(src))
    report = report_by_name(quantize(src, tmp_path / "deq.safetensors", "--format", "dequantized", "--group-size", "32"))
    assert {n for n, t in report.items() if t["quantized"]} == set(linears + convs)
    for name in tables:
        assert report[name]["kept"] == "embedding table (looked up, not multiplied)", report[name]
    deq = load_file(str(tmp_path / "deq.safetensors"))
    for name in convs:  # grouped along the flattened input, as the report says
        flat, got = tensors[name].reshape(16, -1), deq[name].reshape(16, -1)
        assert not np.array_equal(flat, got)
        assert np.abs(flat - got).max() <= report[name]["max_error"]
    report = report_by_name(quantize(src, tmp_path / "mlx", "--format", "mlx", "--group-size", "32"))
    assert {n for n, t in report.items() if t["quantized"]} == set(linears)
    assert all("conv weight" in report[n]["kept"] for n in convs)


@pytest.mark.parametrize("fmt,target,flags,reason", [
    ("mlx", "mlx", ["--only", "^qkv"], "--only"),  # anchored by the user: matches nothing
    ("mlx", "mlx", ["--skip", r"weight$"], "--skip"),
    ("mlx", "mlx", ["--only", "patch_embed"], "conv weight"),  # a conv: matched, but mlx keeps convs
    ("compressed-tensors", "ct", ["--only", "fc2"], "not a multiple of the group size"),  # 100 columns
    ("gguf", "out.gguf", ["--only", "norm"], "not a Linear/Conv weight"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_empty_selection_is_refused(sources, tmp_path, fmt, target, flags, reason):
    """A run that would quantize nothing is an error (a mistyped --only would otherwise copy the model and call it
    quantized): exit 2, the input named with the commonest reasons, nothing written."""
    src_path, _ = sources["F32"]
    out = tmp_path / target
    group = [] if fmt == "gguf" else ["--group-size", "32"]
    proc = quantize(src_path, out, "--format", fmt, *group, *flags, check=None)
    assert_refused(proc, 2, out=out, names=(str(src_path), "no tensor to quantize", reason))


@pytest.mark.parametrize("fmt,args", [
    ("mlx", ["--bits", "4", "--group-size", "64"]),
    ("mlx", ["--bits", "3", "--group-size", "32"]),
    ("compressed-tensors", ["--bits", "4", "--group-size", "32"]),
    ("compressed-tensors", ["--bits", "2", "--group-size", "0", "--symmetric"]),
])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_report_totals(sources, tmp_path, fmt, args, dtype):
    src_path, src = sources[dtype]
    out = tmp_path / "out"
    report = quantize(src_path, out, "--format", fmt, *args)
    model = out / "model.safetensors"
    assert report["format"] == fmt and report["method"] == "rtn"
    assert report["bits"] == int(args[1]) and report["group_size"] == (int(args[3]) or None)
    assert report["input_bytes"] == data_section_size(src_path) == sum(w.nbytes for w in src.values())
    assert report["output_bytes"] == data_section_size(model)
    assert report["output_bytes"] < out.joinpath("model.safetensors").stat().st_size
    _, header, _ = read_safetensors_raw(model)
    quantized = [t for t in report["tensors"] if t["quantized"]]
    assert {t["name"] for t in quantized} == {n for n in LINEARS if groupable(n, src, int(args[3]) or None)}
    for t in report["tensors"]:
        assert tuple(t["shape"]) == src[t["name"]].shape
        if t["quantized"]:
            for key in ("bits", "group_size", "sqnr_db", "max_error", "layout"):
                assert key in t, (key, t)
            module = t["name"][: -len(".weight")]
            stored = [n for n in header if n.startswith(module + ".") and n != module + ".bias"]
            assert t["output_bytes"] == stored_bytes(model, stored), (t, stored)
            assert t["sqnr_db"] > 0 and t["max_error"] > 0
        else:
            assert t["output_bytes"] == src[t["name"]].nbytes
    weights = sum(int(np.prod(t["shape"])) for t in quantized)
    assert report["quantized_weights"] == weights
    bpw = sum(t["output_bytes"] for t in quantized) * 8 / weights
    assert report["bits_per_weight"] == pytest.approx(bpw, rel=1e-12)
    if fmt == "mlx":
        bits, group = int(args[1]), int(args[3])
        scale_bits = 16 if dtype == "F16" else 32
        assert report["bits_per_weight"] == pytest.approx(bits + 2 * scale_bits / group, rel=1e-12)
    assert sum(t["output_bytes"] for t in report["tensors"]) == report["output_bytes"]
    # the totals the table prints are in the JSON too
    parameters = sum(int(np.prod(t["shape"])) for t in report["tensors"])
    assert report["bits_per_parameter"] == pytest.approx(report["output_bytes"] * 8 / parameters, rel=1e-12)
    assert report["mean_sqnr_db"] == pytest.approx(np.mean([t["sqnr_db"] for t in quantized]), rel=1e-12)
    assert report["quantized_tensors"] == len(quantized)
    assert report["kept_tensors"] == len(report["tensors"]) - len(quantized)


def test_table_output(sources, tmp_path):
    """Without --json: a table naming each weight and its layout, and the totals line."""
    src_path, _ = sources["F32"]
    proc = run_ckpt("quantize", src_path, tmp_path / "mlx", "--format", "mlx")
    assert QKV in proc.stdout and "mlx-affine 4-bit g64" in proc.stdout
    assert FC2 in proc.stdout and "kept" in proc.stdout
    assert "bits/weight" in proc.stdout and "wrote" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# 9. DINOv2-S


@pytest.mark.skipif(not (DINO_FOLDER / "model.safetensors").is_file(), reason=f"{DINO_FOLDER} missing")
def test_dinov2_mlx_matches_mx_quantize(tmp_path):
    import mlx.core as mx

    src = load_file(str(DINO_FOLDER / "model.safetensors"))
    out = tmp_path / "dino-mlx"
    report = quantize(DINO_FOLDER, out, "--format", "mlx", "--bits", 4, "--group-size", 64)
    linear = [n for n, w in src.items() if w.ndim == 2 and n.endswith(".weight") and "embed" not in n]
    assert len(linear) == 72, len(linear)
    quantized = {t["name"] for t in report["tensors"] if t["quantized"]}
    assert quantized == set(linear)

    arrays = mx.load(str(out / "model.safetensors"))
    for name in linear:
        module = name[: -len(".weight")]
        wq, s, b = mx.quantize(mx.array(src[name]), group_size=64, bits=4)
        assert_same_array(np.array(arrays[name]), np.array(wq), name=f"{name} codes")
        assert_same_array(np.array(arrays[module + ".scales"]), np.array(s), name=f"{name} scales")
        assert_same_array(np.array(arrays[module + ".biases"]), np.array(b), name=f"{name} biases")
    for name, w in src.items():
        if name not in quantized:
            assert_same_array(np.array(arrays[name]), w, name=f"kept {name}")

    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((DINO_FOLDER / "config.json").read_text())
    assert config["model_type"] == source_config["model_type"] == "dinov2"
    for key, value in source_config.items():
        assert config[key] == value, key
    assert config["quantization"] == config["quantization_config"] == {"bits": 4, "group_size": 64, "mode": "affine"}
    pre = out / "preprocessor_config.json"
    assert pre.is_file() and pre.read_bytes() == (DINO_FOLDER / "preprocessor_config.json").read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# 10. GPTQ with data-free calibration (DINOv2-S)

CALIBRATION_SEED = 20261123  # QuantizeCommand.calibrationSeed
GPTQ_LAYERS = ("encoder.layer.0.attention.attention.value.weight", "encoder.layer.0.mlp.fc2.weight",
               "encoder.layer.11.mlp.fc1.weight")


SEQUENTIAL_LAYERS = ("encoder.layer.0.attention.attention.value.weight", "encoder.layer.0.attention.output.dense.weight",
                     "encoder.layer.1.mlp.fc1.weight")


def smooth_noise_images(count: int, seed: int, size: int = 224, channels: int = 3, cell: int = 16) -> np.ndarray:
    """CalibrationImages.smoothNoise in numpy: SplitMix64 uniforms, Box-Muller normals in float64, one per channel
    and 16 x 16-pixel cell, rounded to float32 and repeated over the cell."""
    mask, golden = (1 << 64) - 1, 0x9E3779B97F4A7C15
    cells = (size + cell - 1) // cell
    images = np.empty((count, channels, size, size), np.float32)
    for index in range(count):
        state = seed ^ ((index * golden) & mask)

        def uniform():
            nonlocal state
            state = (state + golden) & mask
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
            return ((z ^ (z >> 31)) >> 11) / 2.0**53 + 0.5 / 2.0**53

        noise = np.empty(channels * cells * cells, np.float32)
        for k in range(noise.size):
            u1 = uniform()
            noise[k] = np.float32(np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * uniform()))
        grid = noise.reshape(channels, cells, cells)
        images[index] = np.repeat(np.repeat(grid, cell, 1), cell, 2)[:, :size, :size]
    return images


def torch_input_grams(images: np.ndarray) -> dict[str, np.ndarray]:
    """X^T X (float64) of every block Linear's input in transformers' Dinov2Model, through forward hooks."""
    import torch
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(str(DINO_FOLDER)).eval()
    grams: dict[str, np.ndarray] = {}

    def hook(names):
        def record(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double().numpy()
            g = x.T @ x
            for n in names:
                grams[n] = grams.get(n, 0) + g
        return record

    for i, layer in enumerate(model.encoder.layer):
        p = f"encoder.layer.{i}."
        layer.attention.q_proj.register_forward_hook(hook([p + f"attention.attention.{k}.weight" for k in ("query", "key", "value")]))
        layer.attention.o_proj.register_forward_hook(hook([p + "attention.output.dense.weight"]))
        layer.mlp.fc1.register_forward_hook(hook([p + "mlp.fc1.weight"]))
        layer.mlp.fc2.register_forward_hook(hook([p + "mlp.fc2.weight"]))
    with torch.no_grad():
        for start in range(0, len(images), 8):
            model(pixel_values=torch.from_numpy(images[start:start + 8]))
    return grams


def gptq_reference(w: np.ndarray, gram: np.ndarray, bits: int, group: int, act_order: bool = False) -> np.ndarray:
    """GPTQ as the paper states it, in float64: 1 % damping, H^-1 = U^T U, one column at a time, each group's MLX
    RTN parameters taken from its updated weights when the first of its columns is reached. With act_order the
    columns are visited in descending order of H's diagonal (ties in column order); groups stay contiguous runs
    of the original columns."""
    cols = w.shape[1]
    h = gram.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    position = np.argsort(order)
    h = h[np.ix_(order, order)]
    h += 0.01 * np.mean(np.diag(h)) * np.eye(cols)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    work, out = w[:, order].astype(np.float64), np.empty_like(w, dtype=np.float64)
    n = 2**bits - 1
    parameters = {}
    for k in range(cols):
        c = order[k]
        g = c // group
        if g not in parameters:
            members = position[g * group:(g + 1) * group]
            _, scale, bias = affine_rtn(work[:, members].astype(np.float32), group, bits)
            parameters[g] = scale[:, 0].astype(np.float64), bias[:, 0].astype(np.float64)
        scale, bias = parameters[g]
        q = np.clip(np.rint((work[:, k] - bias) / scale), 0, n)
        out[:, c] = q * scale + bias
        err = (work[:, k] - out[:, c]) / u[k, k]
        work[:, k + 1:] -= np.outer(err, u[k, k + 1:])
    return out


def torch_module_name(tensor: str) -> str:
    """The transformers-5 Dinov2Model module of a checkpoint weight (HF v4 names, as the bundled folder has)."""
    module = tensor[: -len(".weight")]
    for old, new in ((".attention.attention.query", ".attention.q_proj"), (".attention.attention.key", ".attention.k_proj"),
                     (".attention.attention.value", ".attention.v_proj"), (".attention.output.dense", ".attention.o_proj")):
        module = module.replace(old, new)
    return module


def sequential_gptq_reference(images: np.ndarray, layers, bits: int, group: int, act_order: bool = False) -> dict:
    """Sequential GPTQ in transformers' Dinov2Model: the layers in forward order, each one's input Gram taken with
    the layers before it already replaced by their float64 GPTQ results. Returns {tensor: (quantized, gram)}."""
    import torch
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(str(DINO_FOLDER)).eval()
    modules = dict(model.named_modules())
    result = {}
    for name in layers:
        module = modules[torch_module_name(name)]
        gram = 0

        def record(_module, inputs, _output):
            nonlocal gram
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double().numpy()
            gram = gram + x.T @ x

        handle = module.register_forward_hook(record)
        with torch.no_grad():
            for start in range(0, len(images), 8):
                model(pixel_values=torch.from_numpy(images[start:start + 8]))
        handle.remove()
        w = module.weight.detach().numpy().copy()
        quantized = gptq_reference(w, gram, bits, group, act_order)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(quantized.astype(np.float32)))
        result[name] = (quantized, gram)
    return result


def output_error(w, w_hat, gram) -> float:
    d = (w.astype(np.float64) - w_hat.astype(np.float64))
    return float(np.einsum("rc,cd,rd->", d, gram, d))


CALIBRATION_DATA = REPO / "fixtures/eval/fmnist_calibration.npz"


def eval_preprocess(images: np.ndarray, size: int = 224) -> np.ndarray:
    """ckpt's rule for uint8 grey images: nearest-neighbour x(size/side), u/255, grey to RGB, ImageNet-normalised."""
    mean = np.array([0.485, 0.456, 0.406], np.float32)[None, :, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[None, :, None, None]
    k = size // images.shape[1]
    up = images.repeat(k, 1).repeat(k, 2).astype(np.float32) / np.float32(255)
    return np.ascontiguousarray((up[:, None] - mean) / std, np.float32)


@pytest.mark.skipif(not (DINO_FOLDER / "model.safetensors").is_file(), reason=f"{DINO_FOLDER} missing")
@pytest.mark.parametrize("calibration", ["synthetic", "synthetic-seed", "data"])
def test_dinov2_gptq_calibration(tmp_path, calibration):
    """--gptq: the calibration images, the model's Linear inputs and the GPTQ rounding, each against an
    independent computation (numpy images, transformers hooks, the paper's algorithm in float64)."""
    src = load_file(str(DINO_FOLDER / "model.safetensors"))
    out = tmp_path / "gptq"
    only = "|".join(re.escape(n) for n in GPTQ_LAYERS)
    extra = {"synthetic": [], "synthetic-seed": ["--calibration-seed", 7],
             "data": ["--calibration-data", CALIBRATION_DATA]}[calibration]
    report = quantize(DINO_FOLDER, out, "--format", "dequantized", "--bits", 4, "--group-size", 64, "--gptq",
                      "--no-act-order", "--no-sequential", "--calibration-images", 16, "--only", only, *extra)
    assert report["gptq"] is True and report["calibration_images"] == 16
    if calibration == "data":
        assert report["calibration"] == {"data": [str(CALIBRATION_DATA)]}
        images = eval_preprocess(np.load(CALIBRATION_DATA)["images"][:16])
    else:
        seed = 7 if calibration == "synthetic-seed" else CALIBRATION_SEED
        assert report["calibration"] == {"synthetic": "smooth-noise", "seed": seed}
        images = smooth_noise_images(16, seed)
    by_name = report_by_name(report)
    assert {n for n, t in by_name.items() if t["quantized"]} == set(GPTQ_LAYERS)
    assert all(by_name[n]["layout"].endswith(" gptq") for n in GPTQ_LAYERS)
    got = load_file(str(out / "model.safetensors"))
    grams = torch_input_grams(images)
    for name in GPTQ_LAYERS:
        w, gram = src[name], grams[name]
        ref = gptq_reference(w, gram, 4, 64)
        q, scale, bias = affine_rtn(w, 64, 4)
        rtn = (q.reshape(w.shape[0], -1, 64) * scale[..., None] + bias[..., None]).reshape(w.shape)
        e_ckpt, e_ref, e_rtn = (output_error(w, x, gram) for x in (got[name], ref, rtn))
        # Float32 Gram sums and forward passes differ from these float64 ones in the last bits, so a few weights
        # near a rounding boundary take the neighbouring code; the output error must agree closely all the same.
        equal = np.mean(np.isclose(got[name], ref, rtol=0, atol=1e-6))
        assert equal >= 0.98, f"{name}: {equal:.4f} of values equal the float64 reference"
        assert abs(e_ckpt - e_ref) <= 0.01 * e_ref, f"{name}: output error {e_ckpt:.4g} vs reference {e_ref:.4g}"
        assert e_ckpt < 0.5 * e_rtn, f"{name}: output error {e_ckpt:.4g} vs plain rounding {e_rtn:.4g}"
    for name, w in src.items():
        if name not in GPTQ_LAYERS:
            assert_same_array(got[name], w, name=f"kept {name}")


@pytest.mark.skipif(not (DINO_FOLDER / "model.safetensors").is_file(), reason=f"{DINO_FOLDER} missing")
@pytest.mark.parametrize("mode", ["act-order", "sequential", "sequential-act-order"])
def test_dinov2_gptq_act_order_and_sequential(tmp_path, mode):
    """--act-order and --sequential against float64 references: act-order GPTQ on transformers' hooked Gram
    matrices, and the sequential pass re-run in transformers with each earlier layer replaced by its reference
    result before the next layer's inputs are taken."""
    src = load_file(str(DINO_FOLDER / "model.safetensors"))
    out = tmp_path / "gptq"
    # The sequential cases use a chain in the first two blocks, each layer reading the ones before it
    # (value -> output projection -> next block's fc1).
    layers = SEQUENTIAL_LAYERS if mode.startswith("sequential") else GPTQ_LAYERS
    only = "|".join(re.escape(n) for n in layers)
    act_order = "act-order" in mode
    # act-order and sequential are on by default: "sequential-act-order" passes no flag.
    flags = {"act-order": ["--no-sequential"], "sequential": ["--no-act-order"], "sequential-act-order": []}[mode]
    report = quantize(DINO_FOLDER, out, "--format", "dequantized", "--bits", 4, "--group-size", 64, "--gptq",
                      "--calibration-data", CALIBRATION_DATA, "--calibration-images", 16, "--only", only, *flags)
    assert report["gptq"] is True and report["act_order"] is act_order and report["sequential"] is mode.startswith("sequential")
    images = eval_preprocess(np.load(CALIBRATION_DATA)["images"][:16])
    got = load_file(str(out / "model.safetensors"))
    if mode.startswith("sequential"):
        references = sequential_gptq_reference(images, layers, 4, 64, act_order)
    else:
        grams = torch_input_grams(images)
        references = {n: (gptq_reference(src[n], grams[n], 4, 64, act_order), grams[n]) for n in layers}
    plain = torch_input_grams(images)
    sequential = mode.startswith("sequential")
    for name in layers:
        ref, gram = references[name]
        w = src[name]
        e_ckpt, e_ref = output_error(w, got[name], gram), output_error(w, ref, gram)
        equal = np.mean(np.isclose(got[name], ref, rtol=0, atol=1e-6))
        if name == layers[0] and act_order:
            # The first column visited (the massive-activation channel) sends large updates through every later
            # column, so float32-vs-float64 differences flip later codes chaotically (about half stay equal) while
            # the output error agrees: the first column itself, rounded before any update, must be equal.
            first = int(np.argmax(np.diag(gram)))
            first_equal = np.mean(np.isclose(got[name][:, first], ref[:, first], rtol=0, atol=1e-6))
            assert first_equal >= 0.99, f"{name}: first act-order column {first}: {first_equal:.4f} equal"
            e_plain = output_error(w, gptq_reference(w, gram, 4, 64), gram)
            assert e_ckpt < 0.7 * e_plain, f"{name}: act-order output error {e_ckpt:.4g} vs plain order {e_plain:.4g}"
        elif name == layers[0]:
            assert equal >= 0.97, f"{name}: {equal:.4f} of values equal the float64 reference"
        elif sequential:
            # A later layer reads the earlier layers' quantized outputs. The few codes float32 and float64 round
            # differently there change its Gram slightly, which the massive channels amplify; still, ckpt's result
            # must be nearer the sequential reference than the one from the unquantized model's Gram.
            assert np.linalg.norm(gram - plain[name]) > 1e-3 * np.linalg.norm(plain[name]), f"{name}: Gram unchanged"
            if not act_order:
                from_plain = np.mean(np.isclose(got[name], gptq_reference(w, plain[name], 4, 64), rtol=0, atol=1e-6))
                assert equal > from_plain + 0.05, f"{name}: {equal:.4f} equal to sequential, {from_plain:.4f} to plain"
        assert abs(e_ckpt - e_ref) <= 0.03 * e_ref, f"{name}: output error {e_ckpt:.4g} vs reference {e_ref:.4g}"


def test_gptq_refuses_gguf_and_non_vit_inputs(sources, tmp_path):
    src, _ = sources["F32"]
    proc = quantize(src, tmp_path / "x.gguf", "--format", "gguf", "--gptq", check=None)
    assert proc.returncode == 64 and "--gptq" in proc.stderr
    proc = quantize(src, tmp_path / "y", "--format", "mlx", "--gptq", "--calibration-images", 0, check=None)
    assert proc.returncode == 64 and "--calibration-images" in proc.stderr
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y").exists()
    proc = quantize(src, tmp_path / "z", "--format", "mlx", "--gptq", check=None)  # a ViT-like file ckpt cannot run
    assert proc.returncode not in (0, 64) and "error" in proc.stderr.lower() and not (tmp_path / "z").exists()


@pytest.mark.skipif(not (DINO_FOLDER / "model.safetensors").is_file(), reason=f"{DINO_FOLDER} missing")
def test_calibration_options_are_checked(tmp_path):
    out = tmp_path / "q"
    proc = quantize(DINO_FOLDER, out, "--format", "mlx", "--calibration-data", CALIBRATION_DATA, check=None)
    assert proc.returncode == 64 and "apply to --gptq" in proc.stderr
    for flag in ("--act-order", "--no-sequential"):
        proc = quantize(DINO_FOLDER, out, "--format", "mlx", flag, check=None)
        assert proc.returncode == 64 and "apply to --gptq" in proc.stderr, flag
    proc = quantize(DINO_FOLDER, out, "--format", "mlx", "--gptq", "--calibration-data", CALIBRATION_DATA,
                    "--calibration-seed", 3, check=None)
    assert proc.returncode == 64 and "--calibration-seed" in proc.stderr
    # 200 images asked of a 128-image set: the file and the count are named, nothing is written.
    proc = quantize(DINO_FOLDER, out, "--format", "mlx", "--gptq", "--calibration-data", CALIBRATION_DATA,
                    "--calibration-images", 200, check=None)
    assert proc.returncode not in (0, 64), proc.stderr
    assert "holds 128 images" in proc.stderr and "fmnist_calibration.npz" in proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    # Several files, one of them labelled: calibration takes the images in order and ignores the labels.
    labelled = REPO / "fixtures/eval/fmnist_eval.npz"
    report = quantize(DINO_FOLDER, out, "--format", "mlx", "--gptq", "--calibration-data", labelled,
                      "--calibration-data", CALIBRATION_DATA, "--calibration-images", 3, "--only", r"layer\.0\.mlp\.fc1")
    assert report["calibration_images"] == 3 and report["calibration"] == {"data": [str(labelled), str(CALIBRATION_DATA)]}
    assert [t["layout"] for t in report["tensors"] if t["quantized"]] == ["mlx-affine 4-bit g64 gptq"]


# ---------------------------------------------------------------------------------------------------------------
# second review of the writers (2026-12-07): interruption, extensions, quantized inputs, GGUF's fused weights,
# config files


@pytest.mark.parametrize("signum", [2, 15, 1], ids=["SIGINT", "SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("fmt", ["gguf", "mlx"])
def test_interrupted_quantize_leaves_nothing(tmp_path, signum, fmt):
    """Ctrl-C, SIGTERM or SIGHUP while the output is being written used to leave `.x.ckpt-tmp-*` files (1.7–25 MB)
    and the new output folder behind. The run now removes them, and the signal still ends it."""
    import signal
    import subprocess
    import time

    from conftest import CKPT_BIN

    out = tmp_path / ("q.gguf" if fmt == "gguf" else "q")
    args = ["--format", "gguf", "--gguf-type", "Q4_K"] if fmt == "gguf" else ["--format", "mlx", "--method", "hqq"]
    # The signal's default action in the child: under `nohup` (as CI runs) SIGHUP arrives ignored, and ckpt keeps
    # an inherited SIG_IGN, as a program run under nohup should.
    proc = subprocess.Popen([str(CKPT_BIN), "quantize", str(DINO_FOLDER), str(out), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    staging = tmp_path if fmt == "gguf" else out
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if staging.is_dir() and temp_leftovers(staging):
            break
        time.sleep(0.002)
    assert proc.poll() is None, "ckpt finished before its temporary file could be seen"
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == -signum
    assert temp_leftovers(tmp_path) == []
    assert not out.exists(), sorted(p.name for p in out.iterdir()) if out.is_dir() else out


@pytest.mark.parametrize("fmt,target,folder_input", [
    ("dequantized", "dq.npz", False), ("dequantized", "dq.gguf", False), ("gguf", "g.safetensors", False),
    ("mlx", "x.gguf", False), ("compressed-tensors", "ct.safetensors", False), ("dequantized", "hf.safetensors", True)])
def test_output_extension_must_match_the_format(sources, tmp_path, fmt, target, folder_input):
    """A .npz holding safetensors bytes, GGUF bytes in a .safetensors, or a folder named x.gguf: files ckpt itself
    could not read back. Refused as usage errors, naming the format, and nothing is created."""
    src_path, _ = sources["F32"]
    if folder_input:
        src_path = tmp_path / "hf-in"
        src_path.mkdir()
        save_file(synthetic_tensors(), str(src_path / "model.safetensors"))
    out = tmp_path / target
    proc = quantize(src_path, out, "--format", fmt, check=None)
    assert proc.returncode == 64, (proc.returncode, proc.stderr)
    assert f"--format {fmt}" in proc.stderr and target in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["mlx", "compressed-tensors"])
def test_already_quantized_input_is_refused(sources, tmp_path, fmt):
    """Quantizing ckpt's own 4-bit output again used to write its modules back as F32 (0.32× 'smaller') while the
    report said 'kept in their dtype'. Refused, as mlx-lm refuses, pointing at `ckpt convert`."""
    src_path, _ = sources["F32"]
    first = tmp_path / "first"
    quantize(src_path, first, "--format", fmt, "--group-size", "32")
    for out_fmt, target in (("mlx", "again"), ("gguf", "again.gguf"), ("dequantized", "again-dq")):
        out = tmp_path / target
        proc = quantize(first, out, "--format", out_fmt, check=None)
        assert_refused(proc, 2, out=out, names=(str(first), "ckpt convert"))
        assert "already quantized" in proc.stderr, proc.stderr


def test_gguf_quantizes_a_fused_in_proj_weight(tmp_path):
    """`nn.MultiheadAttention`'s `in_proj_weight` has no module to hang MLX or compressed-tensors scales on, but a
    GGUF block carries its own: GGUF quantizes it (blocks equal gguf-py's), MLX keeps it with its own reason."""
    import gguf

    rng = np.random.default_rng(7)
    w = (rng.standard_normal((192, 64)) * 0.05).astype(np.float32)
    src = tmp_path / "mha.safetensors"
    save_file({"attn.in_proj_weight": w, "attn.out_proj.weight": w[:64].copy()}, str(src))
    report = report_by_name(quantize(src, tmp_path / "mha.gguf", "--format", "gguf", "--gguf-type", "Q8_0"))
    assert report["attn.in_proj_weight"]["quantized"], report["attn.in_proj_weight"]
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "mha.gguf")).tensors}
    assert tensors["attn.in_proj_weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    expected = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(np.asarray(tensors["attn.in_proj_weight"].data).reshape(-1).view(np.uint8), expected.reshape(-1).view(np.uint8))
    mlx_report = report_by_name(quantize(src, tmp_path / "mha-mlx", "--format", "mlx"))
    assert not mlx_report["attn.in_proj_weight"]["quantized"]
    assert "mlx scales" in mlx_report["attn.in_proj_weight"]["kept"], mlx_report["attn.in_proj_weight"]


def test_input_config_must_be_an_object_and_stale_preprocessor_config_is_refused(sources, tmp_path):
    """An input config.json that is valid JSON but not an object used to be dropped without a word; an output
    folder's preprocessor_config.json that the input does not have (another model's image size, mean and std,
    which run/eval would use) used to survive. Both are errors now, and nothing is written."""
    folder = tmp_path / "in"
    folder.mkdir()
    save_file(synthetic_tensors(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text("[1, 2]")
    for fmt, target in (("mlx", "m"), ("gguf", "g.gguf")):
        proc = quantize(folder, tmp_path / target, "--format", fmt, check=None)
        assert_refused(proc, 2, out=tmp_path / target, names=(str(folder / "config.json"), "JSON object"))
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    out = tmp_path / "out"
    out.mkdir()
    stale = out / "preprocessor_config.json"
    stale.write_text(json.dumps({"image_mean": [9, 9, 9]}))
    proc = quantize(folder, out, "--format", "mlx", check=None)
    assert_refused(proc, 2, names=(str(stale),))
    assert sorted(p.name for p in out.iterdir()) == ["preprocessor_config.json"]
    assert json.loads(stale.read_text()) == {"image_mean": [9, 9, 9]}


def test_compressed_tensors_hqq_is_never_worse_than_rtn_on_one_signed_groups(tmp_path):
    """HQQ's min–max scale spans [min, max] while compressed-tensors' rule widens the range to include 0: on a
    one-signed group the integer zero code clamps and the grid misses the far end (245 of 512 groups ended worse
    than RTN, up to 1.23× mean |error|). Each group now keeps RTN's parameters when they are closer."""
    rng = np.random.default_rng(11)
    w = np.abs(rng.standard_normal((64, 256)) * 0.05).astype(np.float32) + 0.01  # every weight positive
    src = tmp_path / "pos.safetensors"
    save_file({"s.weight": w}, str(src))
    errors = {}
    for method in ("rtn", "hqq"):
        out = tmp_path / method
        quantize(src, out, "--format", "compressed-tensors", "--bits", "3", "--group-size", "32", "--method", method)
        got = readback(out, tmp_path, method)["s.weight"]
        errors[method] = np.abs(got - w).reshape(64, 8, 32).mean(axis=2)
    worse = errors["hqq"] > errors["rtn"] * (1 + 1e-5)
    assert not worse.any(), (int(worse.sum()), float((errors["hqq"] / errors["rtn"]).max()))
    assert (errors["hqq"] < errors["rtn"] * (1 - 1e-3)).any(), "HQQ should still improve some groups"
