"""Hand-made safetensors headers: ckpt accepts exactly what the reference library (safetensors 0.8.0) accepts."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import assert_same_array, run_ckpt, temp_leftovers

A = np.arange(6, dtype=np.float32)
B = np.arange(3, dtype=np.int16)


def _file(header: dict, data: bytes, pad: bool = True) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def _ent(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


VALID = {
    # entries listed against data order, no padding, metadata last
    "reversed_unpadded": (_file({"b": _ent("I16", [3], 24, 30), "a": _ent("F32", [6], 0, 24), "__metadata__": {"k": "v"}},
                                A.tobytes() + B.tobytes(), pad=False), {"a": A, "b": B}),
    # a 4-byte tensor after a 2-byte one: not aligned, still valid
    "unaligned": (_file({"b": _ent("I16", [3], 0, 6), "a": _ent("F32", [6], 6, 30)}, B.tobytes() + A.tobytes()),
                  {"a": A, "b": B}),
    "no_tensors": (_file({}, b""), {}),
    "metadata_only": (_file({"__metadata__": {"format": "pt"}}, b""), {}),
}

INVALID = {
    "gap": _file({"a": _ent("F32", [6], 0, 24), "b": _ent("I16", [3], 26, 32)}, A.tobytes() + b"\0\0" + B.tobytes()),
    "overlap": _file({"a": _ent("F32", [6], 0, 24), "b": _ent("I16", [3], 20, 26)}, A.tobytes() + b"\0\0"),
    "size_mismatch": _file({"a": _ent("F32", [5], 0, 24)}, A.tobytes()),
    "unknown_dtype": _file({"a": _ent("F33", [6], 0, 24)}, A.tobytes()),
    "metadata_not_string": _file({"__metadata__": {"k": 1}, "a": _ent("F32", [6], 0, 24)}, A.tobytes()),
    "not_json": struct.pack("<Q", 8) + b"{'a': 1}",
    "not_object": struct.pack("<Q", 8) + b"[1,2,3] ",
    "offsets_not_from_zero": _file({"a": _ent("F32", [6], 8, 32)}, b"\0" * 8 + A.tobytes()),
}


@pytest.mark.parametrize("case", sorted(VALID))
def test_valid_headers_read(tmp_path, case):
    blob, want = VALID[case]
    src = tmp_path / "in.safetensors"
    src.write_bytes(blob)
    ref = load_file(src)
    assert sorted(ref) == sorted(want)
    out = tmp_path / "out.safetensors"
    run_ckpt("convert", src, out)
    got = load_file(out)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert_same_array(got[k], v, name=k)
    # ckpt's rewrite is the canonical layout save_file produces (the metadata case keeps {"k": "v"} instead)
    if case != "reversed_unpadded":
        canon = tmp_path / "canon.safetensors"
        save_file(want, canon, metadata={"format": "pt"})
        assert out.read_bytes() == canon.read_bytes()


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_headers_refused(tmp_path, case):
    src = tmp_path / f"{case}.safetensors"
    src.write_bytes(INVALID[case])
    with pytest.raises(Exception):
        load_file(src)
    out = tmp_path / "out.npz"
    proc = run_ckpt("convert", src, out, check=None)
    assert proc.returncode == 2 and src.name in proc.stderr
    assert not out.exists() and temp_leftovers(tmp_path) == []
    proc = run_ckpt("inspect", src, "--json", check=None)
    assert proc.returncode == 2 and src.name in proc.stderr
