"""GGUF against gguf-py 0.19.0 (llama.cpp's Python package): ckpt's files read by gguf.GGUFReader, gguf-py's files
(quantized tensors included) read by ckpt, values equal to gguf.quants.dequantize bit for bit."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, inspect_json, run_ckpt, temp_leftovers

RNG = np.random.default_rng(20260823)
QUANTIZED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _vit_like() -> dict[str, np.ndarray]:
    return {
        "cls_token": RNG.standard_normal((1, 1, 64)).astype(np.float32),
        "patch_embed.proj.weight": RNG.standard_normal((64, 3, 4, 4)).astype(np.float32),
        "patch_embed.proj.bias": RNG.standard_normal(64).astype(np.float32),
        "blocks.0.attn.qkv.weight": (RNG.standard_normal((192, 64)) * 0.02).astype(np.float32),
        "blocks.0.mlp.fc1.weight": (RNG.standard_normal((256, 64)) * 0.02).astype(np.float16),
        "head.weight": RNG.standard_normal((10, 64)),
        "steps.i8": np.array([-128, 0, 127], dtype=np.int8),
        "steps.i16": np.array([[-32768, 5], [6, 32767]], dtype=np.int16),
        "steps.i32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
        "steps.i64": np.array([-(2**63), 2**63 - 1], dtype=np.int64),
    }


def _reader_tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value[0]


PLAIN_TYPES = {np.dtype(np.float32): T.F32, np.dtype(np.float16): T.F16, np.dtype(np.float64): T.F64,
               np.dtype(np.int8): T.I8, np.dtype(np.int16): T.I16, np.dtype(np.int32): T.I32, np.dtype(np.int64): T.I64}


def test_convert_to_gguf_read_by_gguf_py(tmp_path):
    tensors = _vit_like()
    save_file(tensors, tmp_path / "vit.safetensors")
    out = tmp_path / "vit.gguf"
    run_ckpt("convert", tmp_path / "vit.safetensors", out)
    reader = gguf.GGUFReader(str(out))
    assert _field(reader, "general.architecture") == "vit"
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16  # fc1 (F16) holds the most elements
    assert "general.alignment" not in reader.fields and out.stat().st_size % 32 == 0
    got = {t.name: t for t in reader.tensors}
    # ckpt keeps the input's order; safetensors files list tensors by dtype, then name.
    assert sorted(got) == sorted(tensors)
    for name, want in tensors.items():
        t = got[name]
        assert t.tensor_type == PLAIN_TYPES[want.dtype], name
        assert list(t.shape) == list(reversed(want.shape)), name  # ne order
        assert t.data.shape == want.shape and t.data.dtype == want.dtype, name
        assert t.data.tobytes() == want.tobytes(), name
        assert t.data_offset % 32 == 0


@pytest.mark.parametrize("dtype,ggml,file_type", [("F16", T.F16, 1), ("BF16", T.BF16, 32), ("F32", T.F32, 0)])
def test_convert_dtype_to_gguf(tmp_path, dtype, ggml, file_type):
    weights = {"w": (RNG.standard_normal((8, 32)) * 3).astype(np.float32), "b": RNG.standard_normal(8)}
    save_file(weights, tmp_path / "in.safetensors")
    out = tmp_path / "out.gguf"
    run_ckpt("convert", tmp_path / "in.safetensors", out, "--dtype", dtype)
    reader = gguf.GGUFReader(str(out))
    assert _field(reader, "general.file_type") == file_type
    for t in reader.tensors:
        assert t.tensor_type == ggml
        want = weights[t.name].astype(ml_dtypes.bfloat16 if dtype == "BF16" else dtype.lower().replace("f", "float"))
        assert t.data.tobytes() == want.tobytes(), t.name


def test_integers_without_gguf_type_are_refused(tmp_path):
    save_file({"ok": np.ones(4, dtype=np.float32), "mask": np.array([1, 0], dtype=np.uint8)}, tmp_path / "in.safetensors")
    proc = run_ckpt("convert", tmp_path / "in.safetensors", tmp_path / "out.gguf", check=2)
    assert "mask" in proc.stderr and "U8" in proc.stderr and "[unsupportedDType]" in proc.stderr
    assert not (tmp_path / "out.gguf").exists() and temp_leftovers(tmp_path) == []


def _write_quantized(path, arrays: dict[str, tuple[T, np.ndarray]], alignment: int | None = None) -> None:
    writer = gguf.GGUFWriter(str(path), "vit")
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, (qtype, data) in arrays.items():
        if qtype in (T.F32, T.F16):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _k_blocks(qtype: T, rows: int, blocks: int) -> np.ndarray:
    """Random K-quant blocks with finite F16 scales (gguf-py only dequantizes these types)."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = RNG.integers(0, 256, size=(rows * blocks, size), dtype=np.uint8)
    scale = RNG.uniform(1e-3, 0.05, size=(rows * blocks, 2)).astype(np.float16).view(np.uint8)
    if qtype == T.Q4_K:
        raw[:, 0:4] = scale
    else:
        raw[:, size - 2:] = scale[:, :2]
    return raw.reshape(rows, blocks * size)


@pytest.fixture(scope="module")
def quantized_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    source = (RNG.standard_normal((96, 1024)) * RNG.choice([1e-3, 0.02, 1.0, 40.0], size=(96, 1))).astype(np.float32)
    arrays = {f"w.{name.lower()}": (T[name], gguf.quants.quantize(source, T[name])) for name in QUANTIZED}
    arrays["w.q4_k"] = (T.Q4_K, _k_blocks(T.Q4_K, 16, 4))
    arrays["w.q6_k"] = (T.Q6_K, _k_blocks(T.Q6_K, 16, 4))
    arrays["norm.weight"] = (T.F32, RNG.standard_normal(1024).astype(np.float32))
    arrays["proj.f16"] = (T.F16, RNG.standard_normal((4, 1024)).astype(np.float16))
    path = folder / "quantized.gguf"
    _write_quantized(path, arrays)
    expected = {name: gguf.quants.dequantize(data, qtype).astype(np.float32) for name, (qtype, data) in arrays.items()}
    return path, arrays, expected


def test_inspect_gguf_py_file(quantized_file):
    path, arrays, expected = quantized_file
    info = inspect_json(path)
    assert info["format"] == "gguf"
    assert info["metadata"]["general.architecture"] == "vit"
    assert info["metadata"]["general.quantization_version"] == "2"
    assert [t["name"] for t in info["tensors"]] == list(arrays)
    for t in info["tensors"]:
        qtype = arrays[t["name"]][0]
        assert t["shape"] == list(expected[t["name"]].shape)
        # Quantized tensors are F32 once read (dequantized on load); plain ones keep their type.
        assert t["dtype"] == ("F16" if qtype == T.F16 else "F32")


def test_convert_gguf_py_file_to_safetensors(quantized_file, tmp_path):
    path, arrays, expected = quantized_file
    out = tmp_path / "dequantized.safetensors"
    run_ckpt("convert", path, out)
    got = load_file(out)
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        if arrays[name][0] == T.F16:
            want = arrays[name][1]
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert got[name].tobytes() == want.tobytes(), f"{name}: values differ from gguf.quants.dequantize"


def test_gguf_to_gguf_keeps_architecture_and_dequantizes(quantized_file, tmp_path):
    path, arrays, expected = quantized_file
    out = tmp_path / "f32.gguf"
    run_ckpt("convert", path, out)
    reader = gguf.GGUFReader(str(out))
    assert _field(reader, "general.architecture") == "vit"
    for t in reader.tensors:
        want = arrays[t.name][1] if arrays[t.name][0] == T.F16 else expected[t.name]
        assert t.data.tobytes() == want.tobytes(), t.name


def test_custom_alignment(tmp_path):
    source = RNG.standard_normal((3, 64)).astype(np.float32)
    path = tmp_path / "a64.gguf"
    _write_quantized(path, {"a": (T.F32, np.arange(5, dtype=np.float32)), "b": (T.Q8_0, gguf.quants.quantize(source, T.Q8_0))}, alignment=64)
    out = tmp_path / "a64.safetensors"
    run_ckpt("convert", path, out)
    got = load_file(out)
    assert got["a"].tolist() == [0, 1, 2, 3, 4]
    assert got["b"].tobytes() == gguf.quants.dequantize(gguf.quants.quantize(source, T.Q8_0), T.Q8_0).tobytes()


def test_fixture_file_matches_its_manifest():
    manifest = json.loads((FIXTURES / "gguf" / "manifest.json").read_text())
    info = inspect_json(FIXTURES / "gguf" / "quantized.gguf")
    assert [t["name"] for t in info["tensors"]] == [t["name"] for t in manifest["tensors"]]
    assert [t["shape"] for t in info["tensors"]] == [t["shape"] for t in manifest["tensors"]]


def _mutated(tmp_path, name: str, blob: bytes):
    path = tmp_path / name
    path.write_bytes(blob)
    return path


@pytest.mark.parametrize("variant,code", [
    ("truncated", "incompleteBuffer"), ("version2", "unsupportedVersion"), ("bigendian", "unsupportedVersion"),
    ("badmagic", "badMagic"), ("misaligned", "invalidOffset"),
])
def test_malformed_gguf_fails_cleanly(quantized_file, tmp_path, variant, code):
    path, _, _ = quantized_file
    blob = bytearray(path.read_bytes())
    if variant == "truncated":
        blob = blob[:-5000]
    elif variant == "version2":
        blob[4:8] = (2).to_bytes(4, "little")
    elif variant == "bigendian":
        blob[4:8] = (3).to_bytes(4, "big")
    elif variant == "badmagic":
        blob[0:4] = b"GGML"
    elif variant == "misaligned":
        # The second tensor info: name, n_dims u32, ne u64 × n_dims, type u32, then its offset u64, moved by 32.
        name = b"w.q4_0"
        at = blob.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
        n_dims = int.from_bytes(blob[at:at + 4], "little")
        at += 4 + 8 * n_dims + 4
        blob[at:at + 8] = (int.from_bytes(blob[at:at + 8], "little") + 32).to_bytes(8, "little")
    bad = _mutated(tmp_path, f"{variant}.gguf", bytes(blob))
    for args in (["inspect", bad], ["convert", bad, tmp_path / "out.safetensors"]):
        proc = run_ckpt(*args, check=2)
        assert bad.name in proc.stderr and f"[{code}]" in proc.stderr, proc.stderr
    assert not (tmp_path / "out.safetensors").exists() and temp_leftovers(tmp_path) == []


def _peak_rss_mib(*args) -> float:
    """Runs ckpt and returns its peak RSS in MiB: ru_maxrss from wait4 in a fresh, small Python that spawns it (Linux
    carries the parent's high-water RSS into a child's ru_maxrss across exec, and this test process holds numpy
    arrays)."""
    import subprocess
    import sys

    from conftest import CKPT_BIN

    launcher = ("import os, sys; pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ, "
                "file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]); "
                "_, status, usage = os.wait4(pid, 0); print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", launcher, str(CKPT_BIN), *map(str, args)],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "0", (args, out)
    return int(out[1]) / 1024


def test_gguf_writer_holds_one_whole_tensor_at_a_time(tmp_path):
    """Tensors that must be loaded whole (deflated .npz members) are written one at a time even though the GGUF
    writer runs on every core: peak memory stays near one tensor, as the sequential writer's did, instead of one
    per core. Six 32 MiB tensors; the file is checked against numpy."""
    arrays = {f"blocks.{i}.fc.weight": np.full((2048, 4096), i + 0.5, dtype=np.float32) for i in range(6)}
    np.savez_compressed(tmp_path / "big.npz", **arrays)
    for args in (["convert", tmp_path / "big.npz", tmp_path / "c.gguf"],
                 ["quantize", tmp_path / "big.npz", tmp_path / "q.gguf", "--format", "gguf", "--gguf-type", "Q8_0"]):
        peak = _peak_rss_mib(*args)
        # One tensor loaded (32 MiB) plus the process and its buffers (46–50 MiB measured); two tensors held at once
        # (one per worker, before the fix) measured 79 MiB.
        assert peak < 64, (args[0], peak)
    reader = gguf.GGUFReader(tmp_path / "c.gguf")
    for t in reader.tensors:
        np.testing.assert_array_equal(np.asarray(t.data).reshape(2048, 4096), arrays[t.name])
