"""Reading every committed fixture like the reference readers, and tensor names that need escaping or Unicode care."""
from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, assert_same_array, inspect_json, read_safetensors_raw, run_ckpt

NPY_FIXTURES = sorted(p.name for p in (FIXTURES / "npy").glob("*.npy")
                      if not p.name.startswith("refuse_") and "ml_dtypes" not in p.name)
ST_FIXTURES = sorted(p.name for p in (FIXTURES / "safetensors").glob("*.safetensors"))


@pytest.mark.parametrize("fixture", NPY_FIXTURES)
def test_npy_fixtures_like_numpy(tmp_path, fixture):
    path = FIXTURES / "npy" / fixture
    want = np.load(path)
    info = inspect_json(path)
    assert info["format"] == "npy"
    (t,) = info["tensors"]
    assert (t["name"], t["shape"], t["bytes"]) == (path.stem, list(want.shape), want.nbytes)
    out_npz, out_npy = tmp_path / "o.npz", tmp_path / "o.npy"
    run_ckpt("convert", path, out_npz)
    run_ckpt("convert", path, out_npy)
    with np.load(out_npz) as z:
        assert z.files == [path.stem]
        assert_same_array(z[path.stem], want, name=fixture)
    assert_same_array(np.load(out_npy), want, name=fixture)


@pytest.mark.parametrize("fixture", ST_FIXTURES)
def test_safetensors_fixtures_rewrite(tmp_path, fixture):
    """Metadata travels (compared parsed: the Rust writer orders metadata keys randomly), and every tensor's
    bytes, dtype code and shape are kept."""
    path = FIXTURES / "safetensors" / fixture
    out = tmp_path / "o.safetensors"
    run_ckpt("convert", path, out)
    meta_in, header_in, data_in = read_safetensors_raw(path)
    meta_out, header_out, data_out = read_safetensors_raw(out)
    # no metadata in → ckpt writes {"format": "pt"}, as save_pretrained-style writers do; otherwise unchanged
    assert meta_out == (meta_in if meta_in else {"format": "pt"})
    with safe_open(str(out), framework="numpy") as f:
        assert f.metadata() == meta_out
    assert sorted(header_out) == sorted(header_in)
    for name, e in header_in.items():
        o = header_out[name]
        assert (o["dtype"], o["shape"]) == (e["dtype"], e["shape"]), name
        assert data_out[slice(*o["data_offsets"])] == data_in[slice(*e["data_offsets"])], name
    info = inspect_json(path)
    assert info["format"] == "safetensors" and info["metadata"] == meta_in
    assert {t["name"]: (t["dtype"], t["shape"]) for t in info["tensors"]} == {
        k: (v["dtype"], v["shape"]) for k, v in header_in.items()}


ODD_NAMES = [
    'quote"inside', "new\nline", "tab\there", "ctl\x01\x1f", "a/b/c", "\u00e9t\u00e9", "e\u0301x",
    "\U0001F600", "\uffff", "\ue000", "Z", "a", "model.layers.0.self_attn.q_proj.weight", " lead space",
]


def test_escaped_and_unicode_names_byte_identical(tmp_path):
    tensors = {n: np.full(3, i, dtype=np.float32) for i, n in enumerate(ODD_NAMES)}
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, src, metadata={"format": "pt"})
    run_ckpt("convert", src, out)
    assert out.read_bytes() == src.read_bytes()
    npz, back = tmp_path / "names.npz", tmp_path / "back.safetensors"
    run_ckpt("convert", src, npz)
    with np.load(npz) as z:
        assert sorted(z.files) == sorted(ODD_NAMES)
        for n, v in tensors.items():
            assert_same_array(z[n], v, name=repr(n))
    run_ckpt("convert", npz, back)
    assert back.read_bytes() == src.read_bytes()


def test_unicode_names_in_shard_index(tmp_path):
    tensors = {n: np.full(3, i, dtype=np.float32) for i, n in enumerate(ODD_NAMES)}
    src, out = tmp_path / "in.safetensors", tmp_path / "shards"
    save_file(tensors, src)
    run_ckpt("convert", src, out, "--max-shard-size", "30")
    text = (out / "model.safetensors.index.json").read_text()
    index = json.loads(text)
    assert sorted(index["weight_map"]) == sorted(ODD_NAMES)
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"  # ensure_ascii escapes, code-point order


def test_canonically_equivalent_names_are_distinct(tmp_path):
    """'café' precomposed (U+00E9) and decomposed (e + U+0301) are different byte strings, hence different tensor
    names for safetensors (Rust String keys) and numpy; ckpt must not merge or reject them."""
    pre, dec = "caf\u00e9", "cafe\u0301"
    assert pre != dec and unicodedata.normalize("NFC", dec) == pre
    tensors = {pre: np.zeros(2, np.float32), dec: np.ones(2, np.float32)}
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, src, metadata={"format": "pt"})
    assert sorted(load_file(src)) == sorted(tensors)  # the reference reader keeps both
    run_ckpt("convert", src, out)
    got = load_file(out)
    assert sorted(got) == sorted(tensors)
    for k, v in tensors.items():
        assert_same_array(got[k], v, name=repr(k))
