"""1. Python writes, ckpt converts, Python reads back: same bytes, dtype and shape for every numpy dtype ckpt handles."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import assert_same_array, run_ckpt

RNG = np.random.default_rng(20240601)


def _int_case(dt) -> np.ndarray:
    info = np.iinfo(dt)
    return np.array([[info.min, -1 if info.min < 0 else 0, 0], [1, info.max - 1, info.max]], dtype=dt)


def _cases() -> dict[str, np.ndarray]:
    c: dict[str, np.ndarray] = {
        "bool": np.array([True, False, True, True, False, False, True]),
        "f2": np.array([[0.0, -0.0, np.inf], [-np.inf, 6.1e-5, 65504.0]], dtype=np.float16),
        "f4": RNG.standard_normal((3, 5)).astype(np.float32),
        "f8": RNG.standard_normal((2, 2, 3)),
        "c8": (RNG.standard_normal((2, 2)) + 1j * RNG.standard_normal((2, 2))).astype(np.complex64),
        "scalar_f8": np.array(3.25),
        "scalar_i4": np.array(-7, dtype=np.int32),
        "empty_0x3": np.zeros((0, 3), dtype=np.float32),
        "fortran_f8": np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4) * 0.5),
        "be_f4": np.arange(6, dtype=">f4").reshape(2, 3) - 2.5,
        "be_i8": np.array([-(2**62), -1, 0, 2**62 + 12345], dtype=">i8"),
        "vec_f4": np.linspace(-1, 1, 5, dtype=np.float32),
    }
    for dt in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64):
        c[np.dtype(dt).str.lstrip("<|")] = _int_case(dt)
    return c


CASES = _cases()
# NumPy-only: safetensors has no complex128 code.
NPY_ONLY = {"c16": np.array([1 + 2j, -np.inf + 0.5j, 3.0 - 4.0j], dtype=np.complex128)}
ALL = {**CASES, **NPY_ONLY}


def _safetensors_ready(a: np.ndarray) -> np.ndarray:
    """save_file wants C-contiguous arrays; it byteswaps big-endian itself, but keep the input plain."""
    a = a.copy(order="C")  # not np.ascontiguousarray: it turns 0-d arrays into shape (1,)
    return a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a


def _read(path) -> dict[str, np.ndarray]:
    path = str(path)
    if path.endswith(".npy"):
        return {"__single__": np.load(path)}
    if path.endswith(".npz"):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    return load_file(path)


TARGETS = [("safetensors", []), ("npz", []), ("npz", ["--compress"])]


@pytest.mark.parametrize("target,flags", TARGETS, ids=["to_safetensors", "to_npz", "to_npz_compressed"])
@pytest.mark.parametrize("source", ["npz", "npz_compressed", "safetensors"])
def test_multi_tensor_roundtrip(tmp_path, source, target, flags):
    arrays = dict(CASES) if (source == "safetensors" or target == "safetensors") else dict(ALL)
    src = tmp_path / f"in.{ 'safetensors' if source == 'safetensors' else 'npz'}"
    if source == "npz":
        np.savez(src, **arrays)
    elif source == "npz_compressed":
        np.savez_compressed(src, **arrays)
    else:
        save_file({k: _safetensors_ready(v) for k, v in arrays.items()}, src)
    out = tmp_path / f"out.{target}"
    run_ckpt("convert", src, out, *flags)
    got = _read(out)
    assert sorted(got) == sorted(arrays)
    for name, want in arrays.items():
        assert_same_array(got[name], want, name=name)


@pytest.mark.parametrize("name", sorted(ALL))
def test_npy_roundtrip_all_formats(tmp_path, name):
    """np.save → ckpt → npy / npz / npz deflated / safetensors, and back from each of those to .npy."""
    want = ALL[name]
    src = tmp_path / f"{name}.npy"
    np.save(src, want)
    targets = ["direct.npy", "t.npz", "tc.npz"] + ([] if name in NPY_ONLY else ["t.safetensors"])
    for t in targets:
        out = tmp_path / t
        run_ckpt("convert", src, out, *(["--compress"] if t == "tc.npz" else []))
        got = _read(out)
        # a single .npy keeps its stem as the tensor name in the containers
        arr = got["__single__"] if t.endswith(".npy") else got[name]
        if not t.endswith(".npy"):
            assert list(got) == [name]
        assert_same_array(arr, want, name=f"{name} via {t}")
        if not t.endswith(".npy"):
            back = tmp_path / f"back_{t}.npy"
            run_ckpt("convert", out, back)
            assert_same_array(np.load(back), want, name=f"{name} via {t} back to npy")


@pytest.mark.parametrize("source", ["npz", "safetensors"])
def test_single_tensor_container_to_npy(tmp_path, source):
    want = CASES["f4"]
    src = tmp_path / f"one.{source}"
    if source == "npz":
        np.savez(src, weight=want)
    else:
        save_file({"weight": want}, src)
    out = tmp_path / "weight.npy"
    run_ckpt("convert", src, out)
    assert_same_array(np.load(out), want)


def test_multi_tensor_to_npy_is_refused(tmp_path):
    src = tmp_path / "two.npz"
    np.savez(src, a=np.zeros(2), b=np.ones(3))
    out = tmp_path / "x.npy"
    proc = run_ckpt("convert", src, out, check=2)
    assert proc.stderr.strip()
    assert not out.exists()
