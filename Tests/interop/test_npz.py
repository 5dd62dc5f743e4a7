"""5. .npz details: stored vs deflated members, CRCs, ZIP64 records, and reading real numpy-written archives."""
from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, assert_same_array, inspect_json, run_ckpt

RNG = np.random.default_rng(5)
NP_TO_CODE = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16",
              "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
              "complex64": "C64", "complex128": "C128"}


def _tensors() -> dict[str, np.ndarray]:
    return {
        "w": RNG.standard_normal((64, 33)).astype(np.float32),
        "zeros": np.zeros((100, 10), dtype=np.float16),
        "ids": np.arange(50, dtype=np.int64),
        "s": np.array(2.5),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "layers.0.attn.weight": RNG.standard_normal(7),
    }


def _npz_from_ckpt(tmp_path, compress: bool):
    src = tmp_path / "in.safetensors"
    tensors = _tensors()
    save_file(tensors, src)
    out = tmp_path / ("c.npz" if compress else "s.npz")
    run_ckpt("convert", src, out, *(["--compress"] if compress else []))
    return tensors, out


@pytest.mark.parametrize("compress", [False, True], ids=["stored", "deflated"])
def test_ckpt_npz_readable_by_numpy_and_zipfile(tmp_path, compress):
    tensors, out = _npz_from_ckpt(tmp_path, compress)
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None  # every CRC-32 checks out
        infos = z.infolist()
        assert sorted(i.filename for i in infos) == sorted(f"{k}.npy" for k in tensors)
        want_method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        assert {i.compress_type for i in infos} == {want_method}
        for i in infos:
            data = z.read(i)
            assert zlib.crc32(data) == i.CRC and len(data) == i.file_size
            if not compress:
                assert i.compress_size == i.file_size
    with np.load(out) as z:
        assert sorted(z.files) == sorted(tensors)
        for name, want in tensors.items():
            assert_same_array(z[name], want, name=name)
    if compress:
        # the zeros member must actually have been deflated
        with zipfile.ZipFile(out) as z:
            zi = z.getinfo("zeros.npy")
            assert zi.compress_size < zi.file_size // 10


def _local_headers(path):
    """Yields (info, local header fields, local extra bytes) for every member."""
    blob = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            off = info.header_offset
            sig, ver, flags, method, _t, _d, crc, csize, usize, nlen, xlen = struct.unpack_from("<IHHHHHIIIHH", blob, off)
            assert sig == 0x04034B50
            name = blob[off + 30 : off + 30 + nlen]
            extra = blob[off + 30 + nlen : off + 30 + nlen + xlen]
            yield info, dict(ver=ver, flags=flags, method=method, crc=crc, csize=csize, usize=usize, name=name), extra


def _zip64_extra(extra: bytes) -> tuple[int, ...] | None:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 0x0001:
            return struct.unpack_from(f"<{size // 8}Q", extra, pos + 4)
        pos += 4 + size
    return None


@pytest.mark.parametrize("compress", [False, True], ids=["stored", "deflated"])
def test_ckpt_npz_zip64_local_extras_are_consistent(tmp_path, compress):
    """Like np.savez (zipfile with force_zip64=True), ckpt may put ZIP64 sizes in the local headers; when it does,
    the saturated 32-bit fields and the 64-bit values must agree with the central directory."""
    _, out = _npz_from_ckpt(tmp_path, compress)
    for info, local, extra in _local_headers(out):
        assert local["name"].decode() == info.filename
        assert local["method"] == info.compress_type and local["crc"] == info.CRC
        z64 = _zip64_extra(extra)
        if local["usize"] == 0xFFFFFFFF or local["csize"] == 0xFFFFFFFF:
            assert z64 is not None and local["ver"] >= 45
            assert z64[0] == info.file_size and z64[1] == info.compress_size
        else:
            assert (local["usize"], local["csize"]) == (info.file_size, info.compress_size)


def _write_full_zip64(members: dict[str, tuple[bytes, int]]) -> bytes:
    """A zip archive with every ZIP64 structure forced: local and central ZIP64 extras (sizes, offset),
    a ZIP64 end record and locator, and a classic end record saturated at 0xFFFF / 0xFFFFFFFF."""
    out = io.BytesIO()
    central = []
    for name, (data, method) in members.items():
        nb = name.encode()
        comp = data
        if method == zipfile.ZIP_DEFLATED:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            comp = c.compress(data) + c.flush()
        crc = zlib.crc32(data)
        offset = out.tell()
        local_extra = struct.pack("<HHQQ", 1, 16, len(data), len(comp))
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, method, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                              len(nb), len(local_extra)) + nb + local_extra + comp)
        cen_extra = struct.pack("<HHQQQ", 1, 24, len(data), len(comp), offset)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, method, 0, 0x21, crc, 0xFFFFFFFF,
                                   0xFFFFFFFF, len(nb), len(cen_extra), 0, 0, 0, 0, 0xFFFFFFFF) + nb + cen_extra)
    cd_offset = out.tell()
    for c in central:
        out.write(c)
    cd_size = out.tell() - cd_offset
    z64_offset = out.tell()
    n = len(central)
    out.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_offset))
    out.write(struct.pack("<IIQI", 0x07064B50, 0, z64_offset, 1))
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
    return out.getvalue()


def _npy_bytes(arr) -> bytes:
    b = io.BytesIO()
    np.save(b, arr)
    return b.getvalue()


def test_ckpt_reads_forced_zip64_archive(tmp_path):
    arrays = {"a": RNG.standard_normal((5, 4)).astype(np.float32), "b": np.arange(300, dtype=np.int16),
              "c": np.zeros(1000, dtype=np.float64)}
    members = {"a.npy": (_npy_bytes(arrays["a"]), zipfile.ZIP_STORED),
               "b.npy": (_npy_bytes(arrays["b"]), zipfile.ZIP_DEFLATED),
               "c.npy": (_npy_bytes(arrays["c"]), zipfile.ZIP_DEFLATED)}
    path = tmp_path / "zip64.npz"
    path.write_bytes(_write_full_zip64(members))
    # the reference readers accept it
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        assert all(i.file_size == len(members[i.filename][0]) for i in z.infolist())
    with np.load(path) as z:
        for k, v in arrays.items():
            assert_same_array(z[k], v, name=k)
    # and so does ckpt
    info = inspect_json(path)
    assert info["format"] == "npz"
    assert [(t["name"], t["dtype"], t["shape"]) for t in info["tensors"]] == [
        ("a", "F32", [5, 4]), ("b", "I16", [300]), ("c", "F64", [1000])]
    out = tmp_path / "out.safetensors"
    run_ckpt("convert", path, out)
    got = load_file(out)
    for k, v in arrays.items():
        assert_same_array(got[k], v, name=k)


class _Unseekable(io.RawIOBase):
    """A write-only stream without seek/tell, so zipfile writes data descriptors (flag bit 3)."""

    def __init__(self):
        self.buf = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.buf += b
        return len(b)


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_ckpt_reads_npz_with_data_descriptors(tmp_path, method):
    arrays = {"x": RNG.standard_normal((8, 8)).astype(np.float32), "y": np.arange(10, dtype=np.uint8)}
    sink = _Unseekable()
    with zipfile.ZipFile(sink, "w", compression=method) as z:
        for k, v in arrays.items():
            with z.open(f"{k}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, v)
    path = tmp_path / "streamed.npz"
    path.write_bytes(bytes(sink.buf))
    with zipfile.ZipFile(path) as z:
        assert all(i.flag_bits & 0x08 for i in z.infolist())
    with np.load(path) as z:
        for k, v in arrays.items():
            assert_same_array(z[k], v)
    out = tmp_path / "out.npz"
    run_ckpt("convert", path, out)
    with np.load(out) as z:
        for k, v in arrays.items():
            assert_same_array(z[k], v, name=k)


@pytest.mark.parametrize("fixture", sorted(p.name for p in (FIXTURES / "npz").glob("*.npz")))
@pytest.mark.parametrize("target", ["npz", "safetensors"])
def test_fixture_npz_read_like_numpy(tmp_path, fixture, target):
    path = FIXTURES / "npz" / fixture
    with np.load(path) as z:
        want = {k: z[k] for k in z.files}
    info = inspect_json(path)
    assert info["format"] == "npz"
    assert [t["name"] for t in info["tensors"]] == list(want)
    for t in info["tensors"]:
        arr = want[t["name"]]
        assert (t["dtype"], t["shape"], t["bytes"]) == (NP_TO_CODE[arr.dtype.name], list(arr.shape), arr.nbytes)
    assert info["total_bytes"] == sum(a.nbytes for a in want.values())
    assert info["total_params"] == sum(a.size for a in want.values())
    out = tmp_path / f"out.{target}"
    run_ckpt("convert", path, out)
    if target == "npz":
        with np.load(out) as z:
            got = {k: z[k] for k in z.files}
    else:
        got = load_file(out)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert_same_array(got[k], v, name=k)


def test_ckpt_writes_zip64_end_records_for_many_members(tmp_path):
    """More than 65,535 members need the ZIP64 end-of-central-directory record and locator. ckpt writes them;
    zipfile and numpy.load read every member back, and ckpt reads its own archive."""
    count = 70_000
    src = tmp_path / "many.safetensors"
    tensors = {f"t{i:05d}": np.array([i], dtype=np.int32) for i in range(count)}
    save_file(tensors, src, metadata={"format": "pt"})
    out = tmp_path / "many.npz"
    run_ckpt("convert", src, out, timeout=300)
    blob = out.read_bytes()
    assert b"PK\x06\x06" in blob[-200:] and b"PK\x06\x07" in blob[-200:], "ZIP64 end record and locator expected"
    eocd = blob[-22:]
    assert eocd[:4] == b"PK\x05\x06" and struct.unpack("<H", eocd[10:12])[0] == 0xFFFF
    with zipfile.ZipFile(out) as z:
        assert len(z.infolist()) == count
    loaded = np.load(out)
    assert len(loaded.files) == count
    for i in (0, 1, 65_535, 65_536, count - 1):
        assert loaded[f"t{i:05d}"].tolist() == [i]
    info = inspect_json(out)
    assert len(info["tensors"]) == count and info["total_bytes"] == 4 * count
