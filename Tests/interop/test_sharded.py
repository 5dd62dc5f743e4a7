"""6. Hugging Face sharded safetensors: ckpt's split and index agree with huggingface_hub, and ckpt reads shards."""
from __future__ import annotations

import json

import numpy as np
import pytest
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, assert_same_array, inspect_json, read_safetensors_raw, run_ckpt, temp_leftovers

RNG = np.random.default_rng(66)


def _model() -> dict[str, np.ndarray]:
    """~3.4 MB of F32 tensors of uneven sizes, named so that data order (all F32: name order) is the HF order."""
    sizes = [(256, 512), (512,), (300, 300), (64, 64), (700, 400), (10,), (128, 1024), (1,), (333, 77), (200, 200),
             (100, 1000), (4,), (250, 250)]
    return {f"model.layers.{i:02d}.weight": RNG.standard_normal(s).astype(np.float32) for i, s in enumerate(sizes)}


def _file_order(path) -> list[str]:
    """Tensor names in the order their data lies in the file (what a streaming writer sees)."""
    _, header, _ = read_safetensors_raw(path)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def _hf_index(tensors: dict[str, np.ndarray], order: list[str], max_shard_size) -> tuple[dict, dict]:
    split = split_state_dict_into_shards_factory(
        {k: tensors[k] for k in order},
        get_storage_size=lambda t: t.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": split.tensor_to_filename}
    return index, split.filename_to_tensors


@pytest.mark.parametrize("size_arg,size", [("1MB", 1_000_000), ("1500000", 1_500_000), ("1MiB", 1 << 20)])
def test_shards_match_huggingface_hub(tmp_path, size_arg, size):
    tensors = _model()
    src = tmp_path / "model.safetensors"
    save_file(tensors, src, metadata={"format": "pt"})
    out = tmp_path / "sharded"
    run_ckpt("convert", src, out, "--max-shard-size", size_arg)

    index, files = _hf_index(tensors, _file_order(src), size)
    assert len(files) > 1
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "model.safetensors.index.json"])
    text = (out / "model.safetensors.index.json").read_text()
    assert json.loads(text) == index
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"

    merged = {}
    for fname, names in files.items():
        shard = load_file(out / fname)
        assert sorted(shard) == sorted(names), fname
        with safe_open(str(out / fname), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
        merged.update(shard)
    assert sorted(merged) == sorted(tensors)
    for k, v in tensors.items():
        assert_same_array(merged[k], v, name=k)
    assert temp_leftovers(out) == [] and temp_leftovers(tmp_path) == []


def test_tensor_larger_than_shard_gets_own_shard(tmp_path):
    tensors = {"a": np.ones(10, np.float32), "big": np.zeros(300_000, np.float32), "c": np.ones(20, np.float32)}
    src = tmp_path / "m.safetensors"
    save_file(tensors, src)
    out = tmp_path / "out"
    run_ckpt("convert", src, out, "--max-shard-size", "1MB")
    index, files = _hf_index(tensors, _file_order(src), 1_000_000)
    assert json.loads((out / "model.safetensors.index.json").read_text()) == index
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "model.safetensors.index.json"])


def test_single_shard_is_plain_model_safetensors(tmp_path):
    tensors = {"a": np.ones(10, np.float32), "b": np.arange(6, dtype=np.int64)}
    src = tmp_path / "m.npz"
    np.savez(src, **tensors)
    out = tmp_path / "out"
    run_ckpt("convert", src, out, "--max-shard-size", "1MB")
    _, files = _hf_index(tensors, list(tensors), 1_000_000)
    assert list(files) == ["model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, ref, metadata={"format": "pt"})
    assert (out / "model.safetensors").read_bytes() == ref.read_bytes()


def _fixture_merged() -> dict[str, np.ndarray]:
    index = json.loads((FIXTURES / "sharded" / "model.safetensors.index.json").read_text())
    merged = {}
    for fname in sorted(set(index["weight_map"].values())):
        merged.update(load_file(FIXTURES / "sharded" / fname))
    assert sorted(merged) == sorted(index["weight_map"])
    return merged


@pytest.mark.parametrize("which", ["folder", "index"])
def test_reads_fixture_shards_as_one_checkpoint(which):
    path = FIXTURES / "sharded"
    if which == "index":
        path = path / "model.safetensors.index.json"
    info = inspect_json(path)
    assert info["format"] == "safetensors-sharded"
    merged = _fixture_merged()
    assert sorted(t["name"] for t in info["tensors"]) == sorted(merged)
    for t in info["tensors"]:
        a = merged[t["name"]]
        assert (t["dtype"], t["shape"], t["bytes"]) == ("F32", list(a.shape), a.nbytes)
    assert info["total_bytes"] == 11456 == sum(a.nbytes for a in merged.values())
    assert info["total_params"] == sum(a.size for a in merged.values())


def test_fixture_shards_to_single_file_equals_python_merge(tmp_path):
    merged = _fixture_merged()
    out = tmp_path / "merged.safetensors"
    run_ckpt("convert", FIXTURES / "sharded", out)
    got = load_file(out)
    assert sorted(got) == sorted(merged)
    for k, v in merged.items():
        assert_same_array(got[k], v, name=k)
    ref = tmp_path / "ref.safetensors"
    save_file(merged, ref, metadata={"format": "pt"})
    assert out.read_bytes() == ref.read_bytes()


def test_resharding_fixture_follows_huggingface_hub(tmp_path):
    """Re-splitting the fixture: the weight_map equals huggingface_hub's split of the tensors in the order ckpt
    reads them (the order `inspect` lists), and the shards hold the fixture's data."""
    info = inspect_json(FIXTURES / "sharded")
    order = [t["name"] for t in info["tensors"]]
    merged = _fixture_merged()
    out = tmp_path / "resharded"
    run_ckpt("convert", FIXTURES / "sharded", out, "--max-shard-size", "5000")
    index, files = _hf_index(merged, order, 5000)
    text = (out / "model.safetensors.index.json").read_text()
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    for fname, names in files.items():
        shard = load_file(out / fname)
        assert sorted(shard) == sorted(names)
        for k in names:
            assert_same_array(shard[k], merged[k], name=k)


def test_shards_with_dtype_conversion_use_converted_sizes(tmp_path):
    import ml_dtypes

    tensors = _model()
    src = tmp_path / "model.safetensors"
    save_file(tensors, src)
    out = tmp_path / "bf16"
    run_ckpt("convert", src, out, "--max-shard-size", "1MB", "--dtype", "BF16")
    converted = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    index, files = _hf_index(converted, _file_order(src), 1_000_000)
    assert (out / "model.safetensors.index.json").read_text() == json.dumps(index, indent=2, sort_keys=True) + "\n"
    for fname, names in files.items():
        _, header, data = read_safetensors_raw(out / fname)
        assert sorted(header) == sorted(names)
        for k in names:
            assert header[k]["dtype"] == "BF16"
            assert data[slice(*header[k]["data_offsets"])] == converted[k].tobytes(), k


def test_diff_sharded_against_merged(tmp_path):
    merged = tmp_path / "merged.npz"
    np.savez(merged, **_fixture_merged())
    run_ckpt("diff", FIXTURES / "sharded", merged, check=0)
    run_ckpt("diff", FIXTURES / "sharded" / "model.safetensors.index.json", merged, check=0)
