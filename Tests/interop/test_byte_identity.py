"""2. ckpt's writers produce the same bytes as the reference writers (np.save, safetensors.numpy.save_file)."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import run_ckpt

RNG = np.random.default_rng(7)

NPY_ARRAYS = {
    "f4_2d": RNG.standard_normal((3, 4)).astype(np.float32),
    "f8_3d": RNG.standard_normal((2, 3, 4)),
    "f2_1d": RNG.standard_normal(9).astype(np.float16),
    "f4_0d": np.array(1.5, dtype=np.float32),
    "i8_0d": np.array(-(2**40), dtype=np.int64),
    "i1_1d": np.arange(-5, 5, dtype=np.int8),
    "u1_2d": np.arange(6, dtype=np.uint8).reshape(2, 3),
    "i2_1d": np.array([-32768, 0, 32767], dtype=np.int16),
    "u2_1d": np.array([0, 65535], dtype=np.uint16),
    "i4_2d": np.arange(-6, 6, dtype=np.int32).reshape(3, 4),
    "u4_1d": np.array([0, 2**32 - 1], dtype=np.uint32),
    "u8_1d": np.array([0, 2**64 - 1], dtype=np.uint64),
    "bool_1d": np.array([True, False, True]),
    "c8_2d": (np.arange(4) + 1j * np.arange(4)).astype(np.complex64).reshape(2, 2),
    "f4_empty": np.zeros((0, 3), dtype=np.float32),
    "f4_1elem": np.array([2.0], dtype=np.float32),
    "f4_4d": RNG.standard_normal((2, 1, 3, 2)).astype(np.float32),
    "f4_long_shape": np.zeros((1, 1, 1, 1, 1, 1, 1, 2), dtype=np.float32),
    "f8_wide": np.zeros((1000000, 0)),
}


@pytest.mark.parametrize("name", sorted(NPY_ARRAYS))
@pytest.mark.parametrize("source", ["safetensors", "npz"])
def test_npy_bytes_equal_np_save(tmp_path, name, source):
    arr = NPY_ARRAYS[name]
    src = tmp_path / f"in.{source}"
    if source == "npz":
        np.savez(src, **{name: arr})
    else:
        save_file({name: arr}, src)
    out = tmp_path / "ckpt.npy"
    ref = tmp_path / "ref.npy"
    run_ckpt("convert", src, out)
    np.save(ref, arr)
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("arr", [np.arange(6, dtype=">f4").reshape(2, 3), np.array([1, -2, 3], dtype=">i8")],
                         ids=["be_f4", "be_i8"])
def test_big_endian_npy_written_as_little_endian_np_save(tmp_path, arr):
    src, out, ref = tmp_path / "be.npy", tmp_path / "out.npy", tmp_path / "ref.npy"
    np.save(src, arr)
    run_ckpt("convert", src, out)
    np.save(ref, arr.astype(arr.dtype.newbyteorder("<")))
    assert out.read_bytes() == ref.read_bytes()


def _mixed_tensors() -> dict[str, np.ndarray]:
    # names chosen so that name order differs from the (alignment desc, name) data order safetensors uses
    return {
        "a_u8": np.arange(5, dtype=np.uint8),
        "b_f64": RNG.standard_normal((2, 3)),
        "c_bool": np.array([True, False]),
        "d_f16": RNG.standard_normal(7).astype(np.float16),
        "e_i64": np.array([-1, 2**62], dtype=np.int64),
        "f_f32": RNG.standard_normal((4, 4)).astype(np.float32),
        "g_i16": np.array([1, -2, 3], dtype=np.int16),
        "h_scalar": np.array(4.0, dtype=np.float32),
        "i_empty": np.zeros((0, 4), dtype=np.float32),
        "j_c64": np.array([1 + 1j], dtype=np.complex64),
        "model.layers.0.weight": RNG.standard_normal((3, 2)).astype(np.float32),
        "k_u32": np.array([7, 8, 9], dtype=np.uint32),
        "l_i8": np.array([-128, 127], dtype=np.int8),
    }


def test_npz_to_safetensors_equals_save_file(tmp_path):
    tensors = _mixed_tensors()
    src, out, ref = tmp_path / "in.npz", tmp_path / "out.safetensors", tmp_path / "ref.safetensors"
    np.savez(src, **tensors)
    run_ckpt("convert", src, out)
    with np.load(src) as z:
        save_file({k: z[k] for k in z.files}, ref, metadata={"format": "pt"})
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}], ids=["no_metadata", "format_pt"])
def test_safetensors_rewrite_equals_save_file(tmp_path, metadata):
    tensors = _mixed_tensors()
    src, out, ref = tmp_path / "in.safetensors", tmp_path / "out.safetensors", tmp_path / "ref.safetensors"
    save_file(tensors, src, metadata=metadata)
    run_ckpt("convert", src, out)
    save_file(tensors, ref, metadata={"format": "pt"})
    assert out.read_bytes() == ref.read_bytes()


def test_bf16_f8_safetensors_rewrite_equals_save_file(tmp_path):
    bits16 = RNG.integers(0, 2**16, 33, dtype=np.uint16)
    bits8 = np.arange(256, dtype=np.uint8)
    tensors = {
        "bf16": bits16.view(ml_dtypes.bfloat16),
        "e4m3": bits8.view(ml_dtypes.float8_e4m3fn),
        "e5m2": bits8.view(ml_dtypes.float8_e5m2),
        "f32": np.ones(3, dtype=np.float32),
    }
    src, out, ref = tmp_path / "in.safetensors", tmp_path / "out.safetensors", tmp_path / "ref.safetensors"
    save_file(tensors, src)
    run_ckpt("convert", src, out)
    save_file(tensors, ref, metadata={"format": "pt"})
    assert out.read_bytes() == ref.read_bytes()


def test_npy_to_safetensors_equals_save_file(tmp_path):
    arr = RNG.standard_normal((5, 3)).astype(np.float32)
    src, out, ref = tmp_path / "w.npy", tmp_path / "out.safetensors", tmp_path / "ref.safetensors"
    np.save(src, arr)
    run_ckpt("convert", src, out)
    save_file({"w": arr}, ref, metadata={"format": "pt"})
    assert out.read_bytes() == ref.read_bytes()
    # the header is valid JSON padded with spaces to a multiple of 8, as the Rust writer does
    n = int.from_bytes(out.read_bytes()[:8], "little")
    assert n % 8 == 0
    json.loads(out.read_bytes()[8 : 8 + n])
