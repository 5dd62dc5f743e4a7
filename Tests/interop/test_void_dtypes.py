"""4. BF16 / F8 through .npz and .npy: void descrs as ml_dtypes + numpy write them, the ckpt dtype manifest,
and --void-dtype for files without one."""
from __future__ import annotations

import json
import zipfile

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import FIXTURES, inspect_json, raw_tensor, read_safetensors_raw, run_ckpt, temp_leftovers

RNG = np.random.default_rng(99)
F8 = {
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
    "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}


def _tensors() -> dict[str, np.ndarray]:
    t = {
        "bf16": RNG.integers(0, 2**16, (4, 5), dtype=np.uint16).view(ml_dtypes.bfloat16),
        "bf16_scalar": np.array(0x3FC0, dtype=np.uint16).view(ml_dtypes.bfloat16).reshape(()),
        "f32": RNG.standard_normal(6).astype(np.float32),
    }
    for code, dt in F8.items():
        t[code.lower()] = np.arange(256, dtype=np.uint8).view(dt).reshape(16, 16)
    return t


@pytest.mark.parametrize("compress", [False, True], ids=["stored", "deflated"])
def test_bf16_f8_safetensors_to_npz_and_back(tmp_path, compress):
    tensors = _tensors()
    src, npz, back = tmp_path / "in.safetensors", tmp_path / "mid.npz", tmp_path / "back.safetensors"
    save_file(tensors, src, metadata={"format": "pt"})
    run_ckpt("convert", src, npz, *(["--compress"] if compress else []))

    with np.load(npz) as z:
        assert sorted(z.files) == sorted([*tensors, "__ckpt_dtypes__.json"])
        for name, arr in tensors.items():
            got = z[name]
            if arr.dtype.itemsize == 4:
                assert got.dtype == np.float32 and got.tobytes() == arr.tobytes()
                continue
            assert got.dtype == np.dtype(f"V{arr.dtype.itemsize}"), name
            assert got.shape == arr.shape, name
            assert got.tobytes() == arr.tobytes(), name
            # the same raw bytes that ml_dtypes gives when viewing numpy's void array
            assert (got.reshape(-1).view(arr.dtype).view(np.uint8) == arr.reshape(-1).view(np.uint8)).all()
    # descr strings exactly as numpy writes them for ml_dtypes arrays: '<V2' and '<V1'
    with zipfile.ZipFile(npz) as z:
        raw = z.read("bf16.npy")
        assert b"'descr': '<V2'" in raw[:128]
        assert b"'descr': '<V1'" in z.read("f8_e4m3.npy")[:128]
        manifest = json.loads(z.read("__ckpt_dtypes__.json"))
    assert manifest == {name: ("BF16" if name.startswith("bf16") else name.upper())
                        for name in tensors if name != "f32"}

    # with the manifest, ckpt reads the npz back to the original dtypes without --void-dtype
    info = inspect_json(npz)
    assert {t["name"]: t["dtype"] for t in info["tensors"]} == {
        name: ("F32" if name == "f32" else manifest[name]) for name in tensors}
    assert all(t["name"] != "__ckpt_dtypes__.json" for t in info["tensors"])
    run_ckpt("convert", npz, back)
    assert back.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("code", ["BF16", *F8])
def test_single_bf16_f8_to_npy_equals_np_save(tmp_path, code):
    dt = ml_dtypes.bfloat16 if code == "BF16" else F8[code]
    bits = np.arange(2**16 if code == "BF16" else 256, dtype=np.uint16 if code == "BF16" else np.uint8)
    arr = bits.view(dt)
    src, out, ref = tmp_path / "x.safetensors", tmp_path / "x.npy", tmp_path / "ref.npy"
    save_file({"x": arr}, src)
    run_ckpt("convert", src, out)
    # np.save of float8_e5m2 writes descr '<f1', which numpy itself cannot load (fixtures/npy/refuse_f8_e5m2_f1.npy);
    # ckpt writes '<V1' as for the other float8 types, so compare with np.save of the same bytes as float8_e4m3fn.
    np.save(ref, arr.view(ml_dtypes.float8_e4m3fn) if code == "F8_E5M2" else arr)
    assert out.read_bytes() == ref.read_bytes()


def test_ml_dtypes_npy_needs_void_dtype(tmp_path):
    arr = RNG.integers(0, 2**16, (3, 7), dtype=np.uint16).view(ml_dtypes.bfloat16)
    src = tmp_path / "w.npy"
    np.save(src, arr)
    before = src.read_bytes()
    out = tmp_path / "w.safetensors"
    proc = run_ckpt("convert", src, out, check=2)
    assert "w.npy" in proc.stderr and "--void-dtype" in proc.stderr
    assert not out.exists() and temp_leftovers(tmp_path) == []
    proc = run_ckpt("inspect", src, "--json", check=2)
    assert "--void-dtype" in proc.stderr

    run_ckpt("convert", src, out, "--void-dtype", "BF16")
    assert src.read_bytes() == before
    _, header, _ = read_safetensors_raw(out)
    assert header["w"]["dtype"] == "BF16" and header["w"]["shape"] == [3, 7]
    assert raw_tensor(out, "w", np.uint16).tobytes() == arr.tobytes()
    # and the values agree with ml_dtypes after a --dtype F32 conversion
    out32 = tmp_path / "w32.safetensors"
    run_ckpt("convert", src, out32, "--void-dtype", "BF16", "--dtype", "F32")
    got = raw_tensor(out32, "w", np.float32)
    want = arr.astype(np.float32)
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all() and got[~nan].tobytes() == want[~nan].tobytes()


def test_ml_dtypes_npz_without_manifest_needs_void_dtype(tmp_path):
    bf = RNG.integers(0, 2**16, 9, dtype=np.uint16).view(ml_dtypes.bfloat16)
    f8 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)  # (np.save of e5m2 writes '<f1')
    src = tmp_path / "m.npz"
    np.savez_compressed(src, bf=bf, f8=f8, ok=np.arange(3, dtype=np.int32))
    out = tmp_path / "m.safetensors"
    run_ckpt("convert", src, out, check=2)
    assert not out.exists() and temp_leftovers(tmp_path) == []
    # only one of the two sizes named: still an error
    run_ckpt("convert", src, out, "--void-dtype", "BF16", check=2)
    assert not out.exists()
    run_ckpt("convert", src, out, "--void-dtype", "BF16", "--void-dtype", "F8_E4M3")
    _, header, _ = read_safetensors_raw(out)
    assert {k: v["dtype"] for k, v in header.items()} == {"bf": "BF16", "f8": "F8_E4M3", "ok": "I32"}
    assert raw_tensor(out, "bf", np.uint16).tobytes() == bf.tobytes()
    assert raw_tensor(out, "f8", np.uint8).tobytes() == f8.tobytes()


@pytest.mark.parametrize("fixture,void,code,dt", [
    ("bf16_ml_dtypes.npy", "BF16", "BF16", ml_dtypes.bfloat16),
    ("f8_e4m3fn_ml_dtypes.npy", "F8_E4M3", "F8_E4M3", ml_dtypes.float8_e4m3fn),
])
def test_void_fixtures(tmp_path, fixture, void, code, dt):
    path = FIXTURES / "npy" / fixture
    info = inspect_json(path, "--void-dtype", void)
    arr = np.load(path).view(dt)
    assert info["tensors"] == [{"name": path.stem, "dtype": code, "shape": list(arr.shape), "bytes": arr.nbytes}]
    out = tmp_path / "f.safetensors"
    run_ckpt("convert", path, out, "--void-dtype", void)
    assert raw_tensor(out, path.stem, np.uint8).tobytes() == arr.tobytes()
