"""8. Errors: exit status 2, a message naming the file on stderr, no output and no temp file left, input untouched."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, run_ckpt, temp_leftovers

RNG = np.random.default_rng(8)


def _good_safetensors(path):
    save_file({"a": RNG.standard_normal((64, 64)).astype(np.float32), "b": np.arange(100, dtype=np.int32)}, path)
    return path.read_bytes()


def _assert_clean_failure(proc, names_file, out, folder, input_path=None, input_bytes=None):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.strip(), "no message on stderr"
    assert names_file in proc.stderr, f"stderr does not name {names_file}: {proc.stderr!r}"
    assert proc.stdout == ""
    if out is not None:
        assert not out.exists(), f"{out} was left behind"
    assert temp_leftovers(folder) == []
    if input_path is not None:
        assert input_path.read_bytes() == input_bytes, "input was modified"


def _corrupt_variants(tmp_path):
    good = _good_safetensors(tmp_path / "good.safetensors")
    n = int.from_bytes(good[:8], "little")
    return {
        "truncated_data": good[:-5],
        "truncated_header": good[: 8 + n // 2],
        "only_length": good[:8],
        "trailing_bytes": good + b"\x00" * 8,
        "header_too_long": (len(good) + 100).to_bytes(8, "little") + good[8:],
    }


@pytest.mark.parametrize("variant", ["truncated_data", "truncated_header", "only_length", "trailing_bytes",
                                     "header_too_long"])
@pytest.mark.parametrize("target", ["out.npz", "out.safetensors", "shards/"])
def test_bad_safetensors_convert(tmp_path, variant, target):
    blob = _corrupt_variants(tmp_path)[variant]
    src = tmp_path / f"{variant}.safetensors"
    src.write_bytes(blob)
    # the reference library rejects it too
    with pytest.raises(Exception):
        load_file(src)
    out = tmp_path / target.rstrip("/")
    proc = run_ckpt("convert", src, str(out) + ("/" if target.endswith("/") else ""), check=None)
    _assert_clean_failure(proc, src.name, out, tmp_path, src, blob)


@pytest.mark.parametrize("variant", ["truncated_data", "truncated_header", "trailing_bytes"])
def test_bad_safetensors_inspect_and_diff(tmp_path, variant):
    blob = _corrupt_variants(tmp_path)[variant]
    src = tmp_path / f"{variant}.safetensors"
    src.write_bytes(blob)
    _assert_clean_failure(run_ckpt("inspect", src, "--json", check=None), src.name, None, tmp_path)
    proc = run_ckpt("diff", tmp_path / "good.safetensors", src, check=None)
    _assert_clean_failure(proc, src.name, None, tmp_path)


def _npz_with_flipped_byte(tmp_path, compress: bool):
    src = tmp_path / "in.npz"
    arrays = {"first": np.arange(1000, dtype=np.float32), "last": RNG.standard_normal(50_000)}
    (np.savez_compressed if compress else np.savez)(src, **arrays)
    blob = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = z.getinfo("last.npy")
    # local header: 30 bytes + name + extra; flip a byte in the middle of the member's data
    name_len = int.from_bytes(blob[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(blob[info.header_offset + 28 : info.header_offset + 30], "little")
    data_start = info.header_offset + 30 + name_len + extra_len
    blob[data_start + info.compress_size // 2] ^= 0x5A
    src.write_bytes(bytes(blob))
    return src, bytes(blob)


@pytest.mark.parametrize("target", ["out.safetensors", "out.npz", "shards/"])
def test_npz_bad_crc_stored(tmp_path, target):
    src, blob = _npz_with_flipped_byte(tmp_path, compress=False)
    with zipfile.ZipFile(src) as z:
        assert z.testzip() == "last.npy"  # zipfile sees the CRC mismatch
    with pytest.raises(zipfile.BadZipFile):
        with np.load(src) as z:
            z["last"]
    out = tmp_path / target.rstrip("/")
    proc = run_ckpt("convert", src, str(out) + ("/" if target.endswith("/") else ""), check=None)
    _assert_clean_failure(proc, src.name, out, tmp_path, src, blob)
    _assert_clean_failure(run_ckpt("diff", src, src, check=None), src.name, None, tmp_path)


def test_npz_corrupt_deflate_member(tmp_path):
    src, blob = _npz_with_flipped_byte(tmp_path, compress=True)
    with pytest.raises(Exception):
        with np.load(src) as z:
            z["last"]
    out = tmp_path / "out.safetensors"
    proc = run_ckpt("convert", src, out, check=None)
    _assert_clean_failure(proc, src.name, out, tmp_path, src, blob)


@pytest.mark.parametrize("ext", ["safetensors", "npz", "npy"])
def test_convert_onto_itself(tmp_path, ext):
    src = tmp_path / f"x.{ext}"
    if ext == "safetensors":
        save_file({"x": np.ones(4, np.float32)}, src)
    elif ext == "npz":
        np.savez(src, x=np.ones(4))
    else:
        np.save(src, np.ones(4))
    blob = src.read_bytes()
    proc = run_ckpt("convert", src, src, check=None)
    _assert_clean_failure(proc, src.name, None, tmp_path, src, blob)
    # the same file under another spelling
    proc = run_ckpt("convert", src, tmp_path / "." / f"x.{ext}", check=None)
    _assert_clean_failure(proc, src.name, None, tmp_path, src, blob)
    proc = run_ckpt("convert", src, src, "--dtype", "F16", check=None)
    _assert_clean_failure(proc, src.name, None, tmp_path, src, blob)


def test_convert_onto_input_via_symlink(tmp_path):
    src = tmp_path / "real.safetensors"
    save_file({"x": np.ones(4, np.float32)}, src)
    blob = src.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    proc = run_ckpt("convert", src, link, check=None)
    assert proc.returncode == 2 and proc.stderr.strip()
    assert src.read_bytes() == blob and link.is_symlink()
    assert temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("fixture", sorted(p.name for p in (FIXTURES / "npy").glob("refuse_*.npy")))
def test_refused_npy_fixtures(tmp_path, fixture):
    src = FIXTURES / "npy" / fixture
    out = tmp_path / "out.safetensors"
    proc = run_ckpt("convert", src, out, check=None)
    _assert_clean_failure(proc, fixture, out, tmp_path)


def test_missing_input(tmp_path):
    out = tmp_path / "out.safetensors"
    proc = run_ckpt("convert", tmp_path / "missing.npz", out, check=None)
    _assert_clean_failure(proc, "missing.npz", out, tmp_path)


def test_failed_conversion_into_existing_folder_leaves_it_empty(tmp_path):
    src, _ = _npz_with_flipped_byte(tmp_path, compress=False)
    out = tmp_path / "existing"
    out.mkdir()
    proc = run_ckpt("convert", src, out, "--max-shard-size", "100KB", check=None)
    assert proc.returncode == 2 and src.name in proc.stderr
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["out.bin"],                                        # no format for this extension
    ["out.safetensors", "--max-shard-size", "1MB"],     # shards need a folder
    ["out.npz", "--dtype", "I8"],                       # not a float target
    ["out.safetensors", "--compress"],                  # --compress is for .npz
    ["shards/", "--max-shard-size", "lots"],           # unparsable size
], ids=["bad_extension", "shards_to_file", "bad_dtype", "compress_not_npz", "bad_size"])
def test_usage_errors_exit_64(tmp_path, args):
    """Usage errors: a message on stderr, ArgumentParser's EX_USAGE status 64 (file errors exit 2), nothing written."""
    src = tmp_path / "x.npz"
    np.savez(src, x=np.ones(3))
    out = tmp_path / args[0].rstrip("/")
    proc = run_ckpt("convert", src, tmp_path / args[0], *args[1:], check=None)
    assert proc.stderr.strip() and not out.exists() and temp_leftovers(tmp_path) == []
    assert proc.returncode == 64, f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[0]}"


@pytest.mark.parametrize("leftover,args", [
    ("weights.safetensors", []),  # beside a new model.safetensors: two files, no index
    ("model.safetensors.index.json", []),  # an index would win over the new file
    ("old.safetensors.index.json", ["--max-shard-size", "10KB"]),  # two indexes
], ids=["other_weights", "index_single", "other_index_shards"])
def test_convert_into_folder_with_other_weights_is_refused(tmp_path, leftover, args):
    """A folder output that already holds weights a reader would take instead of (or beside) the new ones is
    refused, naming them; converting a folder into itself is the common way to get there."""
    folder = tmp_path / "hf"
    folder.mkdir()
    src = folder / "weights.safetensors"
    before = _good_safetensors(src)
    if leftover != src.name:
        (folder / leftover).write_text("{}")
        src = tmp_path / "in.safetensors"
        src.write_bytes(before)
    names = sorted(p.name for p in folder.iterdir())
    proc = run_ckpt("convert", src, f"{folder}/", *args, check=None)
    _assert_clean_failure(proc, leftover, None, folder, src, before)
    assert sorted(p.name for p in folder.iterdir()) == names
