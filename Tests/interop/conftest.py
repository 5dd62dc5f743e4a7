"""Shared helpers for the ckpt interop suite.

The suite drives the built `ckpt` binary and checks its output against the reference Python libraries
(numpy, safetensors, ml_dtypes, huggingface_hub). Set CKPT_BIN to test another binary.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
CKPT_BIN = Path(os.environ.get("CKPT_BIN", REPO / ".build" / "release" / "ckpt"))


def _check_binary() -> None:
    if not CKPT_BIN.is_file() or not os.access(CKPT_BIN, os.X_OK):
        pytest.exit(f"ckpt binary not found at {CKPT_BIN} (build it or set CKPT_BIN)", returncode=2)


def run_ckpt(*args, check: int | None = 0, timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs ckpt with `args`; asserts the exit status equals `check` unless it is None."""
    _check_binary()
    proc = subprocess.run([str(CKPT_BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, (
            f"ckpt {' '.join(map(str, args))} exited {proc.returncode}, expected {check}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def inspect_json(path, *extra) -> dict:
    return json.loads(run_ckpt("inspect", path, "--json", *extra).stdout)


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    """Relative L2 error ‖got − want‖ / ‖want‖ in float64 (0 for two zero tensors)."""
    g, w = got.astype(np.float64), want.astype(np.float64)
    return float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))


def read_safetensors_raw(path) -> tuple[dict, dict[str, dict], bytes]:
    """Parses a safetensors file by hand: (metadata or {}, {name: entry}, data section).
    Used for dtypes the numpy binding can't load back (BF16, F8)."""
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = header.pop("__metadata__", None) or {}
    return meta, header, blob[8 + n :]


def raw_tensor(path, name, np_dtype) -> np.ndarray:
    _, header, data = read_safetensors_raw(path)
    entry = header[name]
    start, end = entry["data_offsets"]
    flat = np.frombuffer(data[start:end], dtype=np_dtype)
    count = int(np.prod(entry["shape"], dtype=np.int64))
    return flat.reshape(entry["shape"]) if flat.size == count else flat


def assert_same_array(got: np.ndarray, want: np.ndarray, *, name: str = "") -> None:
    """Same dtype (native little-endian form of `want`), shape and C-order bytes."""
    want_le = want.astype(want.dtype.newbyteorder("<")) if want.dtype.byteorder == ">" else want
    assert got.dtype == want_le.dtype, f"{name}: dtype {got.dtype} != {want_le.dtype}"
    assert got.shape == want_le.shape, f"{name}: shape {got.shape} != {want_le.shape}"
    assert got.tobytes(order="C") == want_le.tobytes(order="C"), f"{name}: bytes differ"


def temp_leftovers(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if ".ckpt-tmp-" in p.name)


@pytest.fixture(scope="session")
def ckpt_bin() -> Path:
    _check_binary()
    return CKPT_BIN
