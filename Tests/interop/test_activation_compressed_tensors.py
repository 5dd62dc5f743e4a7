"""`ckpt quantize --activation-bits --format compressed-tensors` (static W{b}A{a} int quantization in compressed-tensors'
own `int-quantized` layout, the remaining sites in the side file) against compressed-tensors 0.20 and transformers 5.23.

Models: the tiny transformers Dinov2Model of test_activation_quantization.py (fixture `tiny`: D 32, 2 blocks, separate
query/key/value, LayerScale) and a tiny transformers ViTModel (D 32, 2 blocks, no pooler).

(a) Layout: per block Linear int8 `weight` (codes in the signed b-bit range), F32 `weight_scale` [out, 1], int8
    `weight_zero_point` [out, 1], F32 `input_scale` [1], int8 `input_zero_point` [1]; config.json's
    quantization_config equals what compressed-tensors' own QuantizationConfig/ModelCompressor.update_config write for
    the scheme and parses with its pydantic model; its `IntQuantizationCompressor.decompress` gives exactly the
    dequantized folder's weights (same calibration); every other tensor is byte-identical to the dequantized folder's;
    the input scales/zero points are the dequantized folder's side-file entries (zero point − 2^(a−1)); the side file
    holds exactly the other sites. `ckpt eval`/`ckpt run` of both folders give byte-identical logits.
(b) Clients: transformers' `AutoModel`/`Dinov2Model.from_pretrained` refuse a quantized Dinov2 folder (its SwiGLU
    weight-conversion entry `mlp.weights_in` rejects quantized keys; asserted as that ValueError). compressed-tensors'
    own model path (apply_quantization_config, compress_model, strict state-dict load, decompress_model) on
    transformers' Dinov2Model, and `ViTModel.from_pretrained` on a ViT folder, apply static input quantization on
    every Linear; their outputs match `ckpt run` of the folder without its side file (the Linear-input sites alone).
    Tolerance: compressed-tensors rounds round(x/s + z) where ckpt rounds round(x/s) + z, and the two forwards add in
    different orders, so a value within ~1e-6 of a rounding boundary can land on either side and move the features
    downstream by whole steps (test_activation_quantization.py's "flips"). Measured on these 200 images: Dinov2 W8A8
    and W4A4 and ViT W4A4 agree to 2.3e-6 on every image (features up to 3.8); ViT W8A8 has 2 flipped images, which
    differ by up to 0.015 where input quantization itself moves the features by 0.17. Asserted: images whose CLS
    features differ by more than 1e-4 of their scale are at most 2 %, and there by at most twice the change input
    quantization itself makes; input quantization changes the features by more than 100× that tolerance. (A zero
    point off by one step in both ckpt's writer and reader, invisible to ckpt alone, fails (a) and every test of (b).)
(c) Errors: flag misuse exits 64 with a message, nothing written; quantizing either folder again exits 2; a folder
    whose input quantizers break the rules
    (negative scale, q/k/v disagreeing, a site also in the side file, dynamic activations declared, a zero point
    missing, codes outside the declared width) makes `ckpt eval`/`ckpt run` exit 2 naming the file and tensor or key,
    and write nothing.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import assert_same_array, run_ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_activation_quantization import DEPTH, ckpt_logits, tiny  # noqa: E402,F401  (tiny: the shared fixture)

SIDE = "activation_quantization.json"
LINEAR_SITES = {"qkv.input", "proj.input", "fc1.input", "fc2.input"}
# Dinov2 (transformers-v4 names as saved) and ViT block Linears -> the site that is their input.
DINO_MODULES = {"attention.attention.query": "qkv.input", "attention.attention.key": "qkv.input",
                "attention.attention.value": "qkv.input", "attention.output.dense": "proj.input",
                "mlp.fc1": "fc1.input", "mlp.fc2": "fc2.input"}
VIT_MODULES = {"attention.attention.query": "qkv.input", "attention.attention.key": "qkv.input",
               "attention.attention.value": "qkv.input", "attention.output.dense": "proj.input",
               "intermediate.dense": "fc1.input", "output.dense": "fc2.input"}

CONFIGS = {
    "W8A8": ["--bits", 8, "--activation-bits", 8, "--calibration", "noise", "--calibration-images", 16],
    "W4A4": ["--bits", 4, "--activation-bits", 4, "--calibration", "noise", "--calibration-images", 16],
    "W6A8-rtn-npz": ["--bits", 6, "--activation-bits", 8, "--method", "rtn", "--activation-range", "minmax",
                     "--calibration", "{root}/calibration.npz"],
}
OBSERVERS = {"W8A8": ("percentile", "percentile"), "W4A4": ("percentile", "percentile"), "W6A8-rtn-npz": ("memoryless_minmax", "minmax")}


def modules(table: dict, depth: int = DEPTH) -> dict[str, str]:
    """module name -> side-file site name."""
    return {f"encoder.layer.{i}.{m}": f"blocks.{i}.{s}" for i in range(depth) for m, s in table.items()}


@pytest.fixture(scope="module")
def folders(tiny):
    """name -> (compressed-tensors folder, dequantized folder, the compressed-tensors run's JSON report)."""
    cache: dict[str, tuple[Path, Path, dict]] = {}

    def get(name: str) -> tuple[Path, Path, dict]:
        if name not in cache:
            flags = [str(a).format(root=tiny["root"]) for a in CONFIGS[name]]
            ct, dq = tiny["root"] / f"ct-{name}", tiny["root"] / f"dq-{name}"
            report = json.loads(run_ckpt("quantize", tiny["folder"], ct, "--format", "compressed-tensors", "--head", tiny["head"], *flags,
                                         "--json").stdout)
            run_ckpt("quantize", tiny["folder"], dq, "--format", "dequantized", "--head", tiny["head"], *flags)
            cache[name] = (ct, dq, report)
        return cache[name]

    return get


def library_config(wbits: int, abits: int, observers: tuple[str, str], ignore: list[str]) -> dict:
    """quantization_config as compressed-tensors' ModelCompressor.update_config writes it for this scheme."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(
        targets=["Linear"], format="int-quantized",
        weights=QuantizationArgs(num_bits=wbits, type="int", symmetric=False, strategy="channel", dynamic=False, observer=observers[0]),
        input_activations=QuantizationArgs(num_bits=abits, type="int", symmetric=False, strategy="tensor", dynamic=False,
                                           observer=observers[1]))
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="int-quantized", ignore=ignore, quantization_status="compressed")
    return json.loads(json.dumps({"version": compressed_tensors.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
                                  "transform_config": {}, **qc.model_dump(exclude=["quant_method"])}, sort_keys=True))


def without_side_file(folder: Path, tmp: Path) -> Path:
    """A copy of the folder without its side file: ckpt then applies the stored Linear-input quantizers alone."""
    out = tmp / (folder.name + "-linear-inputs")
    shutil.copytree(folder, out)
    (out / SIDE).unlink()
    return out


# ------------------------------------------------------------------------------------------------------------------
# (a) the layout, compressed-tensors' decompressor, the side file, identical logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layout_and_library_decompressor(folders, name):
    import torch
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file as load_torch

    ct, dq, report = folders(name)
    wbits, abits = report["weight_bits"], report["activation_bits"]
    assert report["format"] == "compressed-tensors"
    assert sorted(p.name for p in ct.iterdir()) == [SIDE, "config.json", "model.safetensors"]
    config = json.loads((ct / "config.json").read_text())
    dq_config = json.loads((dq / "config.json").read_text())
    qconfig = config.pop("quantization_config")
    assert config == dq_config, "config.json: the model's config, the side file named, plus quantization_config"
    assert qconfig == library_config(wbits, abits, OBSERVERS[name], []), "quantization_config differs from compressed-tensors' own"
    qc = QuantizationConfig.model_validate(qconfig)
    scheme = qc.config_groups["group_0"]
    assert qc.format == "int-quantized" and scheme.input_activations.strategy == "tensor" and scheme.input_activations.dynamic is False

    file = load_torch(str(ct / "model.safetensors"))
    dq_tensors = load_file(str(dq / "model.safetensors"))
    dq_side = json.loads((dq / SIDE).read_text())["sites"]
    table = modules(DINO_MODULES)
    # Every other tensor: byte-identical to the dequantized folder's.
    module_keys = {f"{m}.{k}" for m in table for k in ("weight", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point")}
    assert set(file) == (set(dq_tensors) - {m + ".weight" for m in table}) | module_keys
    for key in set(file) - module_keys:
        assert_same_array(file[key].numpy(), dq_tensors[key], name=key)
    for module, site in table.items():
        local = {k[len(module) + 1:]: v for k, v in file.items() if k.startswith(module + ".") and k[len(module) + 1:].count(".") == 0}
        out_features = local["weight"].shape[0]
        assert local["weight"].dtype == torch.int8 and local["weight_zero_point"].dtype == torch.int8 and local["input_zero_point"].dtype == torch.int8
        assert local["weight_scale"].dtype == torch.float32 and local["input_scale"].dtype == torch.float32
        assert tuple(local["weight_scale"].shape) == (out_features, 1) and tuple(local["weight_zero_point"].shape) == (out_features, 1)
        assert tuple(local["input_scale"].shape) == (1,) and tuple(local["input_zero_point"].shape) == (1,)
        codes = local["weight"].numpy().astype(np.int64)
        assert codes.min() >= -(2 ** (wbits - 1)) and codes.max() <= 2 ** (wbits - 1) - 1, f"{module}: codes outside {wbits} bits"
        assert len(np.unique(codes)) > 2 ** (wbits - 1), f"{module}: too few distinct codes"
        weight = IntQuantizationCompressor.decompress({k: v for k, v in local.items() if k.startswith("weight")}, scheme)["weight"]
        assert_same_array(weight.numpy(), dq_tensors[module + ".weight"], name=f"{module}: compressed-tensors decompress vs dequantized folder")
        entry = dq_side[site]
        assert local["input_scale"].numpy().tobytes() == np.float32(entry["scale"]).tobytes(), module
        assert int(local["input_zero_point"]) == entry["zero_point"] - 2 ** (abits - 1), module
    side = json.loads((ct / SIDE).read_text())
    assert side["sites"] == {k: v for k, v in dq_side.items() if k.split(".", 2)[-1] not in LINEAR_SITES}
    assert set(dq_side) - set(side["sites"]) == {f"blocks.{i}.{s}" for i in range(DEPTH) for s in LINEAR_SITES}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_and_run_identical_to_dequantized_folder(tmp_path, tiny, folders, name):
    ct, dq, _ = folders(name)
    for command, images in [("eval", tiny["root"] / "eval.npz"), ("run", tiny["root"] / "x.npy")]:
        (tmp_path / command).mkdir()
        a, fa, da = ckpt_logits(tmp_path / command, ct, images, tiny["head"], command=command)
        (tmp_path / command / "d").mkdir()
        b, fb, db = ckpt_logits(tmp_path / command / "d", dq, images, tiny["head"], command=command)
        assert a.tobytes() == b.tobytes() and fa.tobytes() == fb.tobytes(), f"{command}: the two folders give different logits"
        assert da["activation_quantization"] == db["activation_quantization"]
        assert len(da["activation_quantization"]["sites"]) == 2 + 8 * DEPTH
        if command == "eval":
            assert da["accuracy"] == db["accuracy"]
    # Without the side file: the Linear-input sites alone, in canonical order.
    doc = json.loads(run_ckpt("run", without_side_file(ct, tmp_path), "--images", tiny["root"] / "x.npy", "--json").stdout)
    assert doc["activation_quantization"]["sites"] == [f"blocks.{i}.{s}" for i in range(DEPTH) for s in
                                                       ("qkv.input", "proj.input", "fc1.input", "fc2.input")]


# ------------------------------------------------------------------------------------------------------------------
# (b) clients: transformers and compressed-tensors' model path


def test_transformers_refuses_quantized_dinov2(folders):
    """transformers 5.23's Dinov2 conversion mapping (SwiGLU `weights_in` → gate/up) cannot take the quantizer's
    extra keys: the specific ValueError, for ckpt's folder as for compressed-tensors' own Dinov2 folders."""
    from transformers import AutoModel, Dinov2Model

    ct, _, _ = folders("W8A8")
    for cls in (AutoModel, Dinov2Model):
        with pytest.raises(ValueError, match=r"source keys=\['mlp\.weights_in\.weight', 'mlp\.weights_in\.weight_scale'"):
            cls.from_pretrained(ct)


def assert_features_agree(got: np.ndarray, want: np.ndarray, float_features: np.ndarray, what: str) -> None:
    """The rule of (b) in the module docstring."""
    scale = float(np.abs(want).max())
    effect = float(np.abs(want.astype(np.float64) - float_features).max())
    per_image = np.abs(got.astype(np.float64) - want).max(1)
    flipped = np.where(per_image > 1e-4 * scale)[0]
    assert effect > 100 * 1e-4 * scale, f"{what}: input quantization changes the features by only {effect:.3g}"
    assert len(flipped) <= max(1, int(0.02 * len(got))), f"{what}: {len(flipped)} of {len(got)} images differ (max {per_image.max():.3g}, scale {scale:.3g})"
    if len(flipped):
        assert per_image[flipped].max() <= 2 * effect, f"{what}: a flipped image differs by {per_image[flipped].max():.3g} (effect {effect:.3g})"


def ckpt_features(tmp: Path, folder: Path, x_path: Path, *extra) -> np.ndarray:
    out = tmp / "features.npy"
    run_ckpt("run", folder, "--images", x_path, "--save-features", out, *extra)
    return np.load(out)


@pytest.mark.parametrize("name", ["W8A8", "W4A4"])
def test_compressed_tensors_model_path_dinov2_matches_ckpt_linear_inputs(tmp_path, tiny, folders, name):
    """compressed-tensors' whole-model path (what transformers' quantizer runs) on transformers' Dinov2Model: every
    Linear gets the static input quantizer of the file and the outputs are ckpt's with the Linear-input sites alone."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file as load_torch
    from transformers import Dinov2Config, Dinov2Model

    ct, _, report = folders(name)
    config = json.loads((ct / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config.pop("quantization_config"))
    model = Dinov2Model(Dinov2Config.from_pretrained(tiny["folder"])).eval()
    apply_quantization_config(model, qc)
    compressor = ModelCompressor(quantization_config=qc)
    compressor.compress_model(model)
    # transformers 5 names the attention Linears q/k/v/o_proj; the file keeps the saved (v4) names.
    rename = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
              "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}
    state = {}
    for key, value in load_torch(str(ct / "model.safetensors")).items():
        for old, new in rename.items():
            key = key.replace(old, new)
        state[key] = value
    model.load_state_dict(state, strict=True)
    compressor.decompress_model(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 6 * DEPTH
    abits = report["activation_bits"]
    for n, m in linears.items():
        args = m.quantization_scheme.input_activations
        assert args is not None and args.strategy == "tensor" and args.dynamic is False and args.num_bits == abits, n
        assert m.input_scale.dtype == torch.float32 and m.input_zero_point.dtype == torch.int8, n
    x = tiny["x"]
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(x)).last_hidden_state[:, 0].numpy()
    want = ckpt_features(tmp_path, without_side_file(ct, tmp_path), tiny["root"] / "x.npy")
    float_features = ckpt_features(tmp_path, ct, tiny["root"] / "x.npy", "--no-activation-quantization")
    assert_features_agree(got, want, float_features, f"Dinov2 {name}")


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    import torch
    from transformers import ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("ctvit")
    torch.manual_seed(5)
    config = ViTConfig(hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2, intermediate_size=128, image_size=16, patch_size=4,
                       layer_norm_eps=1e-6, qkv_bias=True)
    ViTModel(config, add_pooling_layer=False).save_pretrained(root / "vit")
    return root


@pytest.mark.parametrize("bits", [8, 4])
def test_transformers_vit_applies_static_input_quantization(tmp_path, tiny, vit_folder, bits):
    """`ViTModel.from_pretrained` on ckpt's W{b}A{b} folder: transformers decompresses the int8 weights and quantizes
    every Linear's input with the stored input_scale/input_zero_point (static, per tensor) — ckpt's Linear-input sites."""
    import torch
    from transformers import ViTModel

    ct = tmp_path / "vit-ct"
    run_ckpt("quantize", vit_folder / "vit", ct, "--format", "compressed-tensors", "--bits", bits, "--activation-bits", bits,
             "--calibration", "noise", "--calibration-images", 16)
    stored = load_file(str(ct / "model.safetensors"))
    assert set(stored) >= {f"{m}.input_scale" for m in modules(VIT_MODULES)}
    model = ViTModel.from_pretrained(ct, add_pooling_layer=False).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 6 * DEPTH
    scales = sorted(float(stored[f"{m}.input_scale"][0]) for m in modules(VIT_MODULES))
    loaded = sorted(float(m.input_scale.detach()) for m in linears.values())
    assert loaded == scales, "transformers loaded other input scales than the file's"
    for n, m in linears.items():
        args = m.quantization_scheme.input_activations
        assert args is not None and args.strategy == "tensor" and args.dynamic is False and args.num_bits == bits, n
    x = tiny["x"]
    with torch.no_grad():
        got = model(torch.from_numpy(x)).last_hidden_state[:, 0].numpy()
    want = ckpt_features(tmp_path, without_side_file(ct, tmp_path), tiny["root"] / "x.npy")
    float_features = ckpt_features(tmp_path, ct, tiny["root"] / "x.npy", "--no-activation-quantization")
    assert_features_agree(got, want, float_features, f"ViT W{bits}A{bits}")


# ------------------------------------------------------------------------------------------------------------------
# (c) errors


FLAG_ERRORS = [
    (["--group-size", 64], "--group-size 64"),
    (["--symmetric"], "--symmetric"),
    (["--gptq"], "--gptq"),
    (["@out.safetensors"], "names a .safetensors file"),
    (["--activation-bits", 9], "--activation-bits 9"),
]


@pytest.mark.parametrize("args,message", FLAG_ERRORS, ids=[m for _, m in FLAG_ERRORS])
def test_flag_errors_exit_64(tmp_path, tiny, args, message):
    out = tmp_path / "out"
    flags = [str(a) for a in args]
    if "@out.safetensors" in flags:
        flags.remove("@out.safetensors")
        out = tmp_path / "out.safetensors"
    base = ["--bits", "8", "--calibration", "noise"] + ([] if "--activation-bits" in flags else ["--activation-bits", "8"])
    proc = run_ckpt("quantize", tiny["folder"], out, "--format", "compressed-tensors", *base, *flags, check=64)
    assert message in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_other_formats_name_both_choices(tmp_path, tiny):
    proc = run_ckpt("quantize", tiny["folder"], tmp_path / "out", "--format", "mlx", "--bits", 4, "--activation-bits", 4, check=64)
    assert "--format mlx" in proc.stderr and "dequantized" in proc.stderr and "compressed-tensors" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("source", ["compressed-tensors", "dequantized"])
def test_quantized_input_is_refused(tmp_path, folders, source):
    """Quantizing either folder again (its weights read back dequantized, its activation quantizers would be lost)
    exits 2 naming the input; nothing is written."""
    ct, dq, _ = folders("W8A8")
    src = ct if source == "compressed-tensors" else dq
    out = tmp_path / "again"
    proc = run_ckpt("quantize", src, out, "--format", "compressed-tensors", "--bits", 8, "--activation-bits", 8, "--calibration", "noise",
                    check=2)
    named = f"{src}: tensor 'encoder.layer." if source == "compressed-tensors" else str(src / SIDE)
    assert proc.stderr.startswith(f"ckpt: error: {named}") and "already" in proc.stderr, proc.stderr
    if source == "compressed-tensors":
        assert "compressed-tensors int-quantized 8-bit" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def _break(folder: Path, case: str) -> tuple[str, str]:
    """Edits the folder; returns (the file the error names, a fragment of the message)."""
    model = folder / "model.safetensors"
    tensors = load_file(str(model))
    query, key = "encoder.layer.0.attention.attention.query", "encoder.layer.0.attention.attention.key"
    if case == "negative input_scale":
        tensors["encoder.layer.1.mlp.fc2.input_scale"] = np.array([-0.5], np.float32)
        save_file(tensors, str(model))
        return str(model), "'encoder.layer.1.mlp.fc2.input_scale': input_scale -0.5 is not a positive finite number"
    if case == "q and k disagree":
        tensors[key + ".input_scale"] = tensors[query + ".input_scale"] * np.float32(1.5)
        save_file(tensors, str(model))
        return str(model), "read the same activation (blocks.0.qkv.input) but store different input quantizers"
    if case == "site twice":
        side = json.loads((folder / SIDE).read_text())
        side["sites"]["blocks.1.fc1.input"] = {"kind": "uniform", "bits": 8, "scale": 0.1, "zero_point": 120}
        (folder / SIDE).write_text(json.dumps(side, indent=2))
        return str(folder / SIDE), "site blocks.1.fc1.input is given twice"
    if case == "dynamic":
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] = True
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        return str(model), "dynamic input activations"
    if case == "no input_zero_point":
        del tensors[query + ".input_zero_point"]
        save_file(tensors, str(model))
        return str(model), f"no {query}.input_zero_point"
    if case == "code outside 4 bits":
        codes = tensors[query + ".weight"].copy()
        codes[3, 7] = 12
        tensors[query + ".weight"] = codes
        save_file(tensors, str(model))
        return str(model), "code 12 at row 3, column 7 is outside the 4-bit range -8…7"
    raise AssertionError(case)


BROKEN = ["negative input_scale", "q and k disagree", "site twice", "dynamic", "no input_zero_point", "code outside 4 bits"]


@pytest.mark.parametrize("case", BROKEN)
def test_broken_folder_exit_2(tmp_path, tiny, folders, case):
    src, _, _ = folders("W4A4")
    folder = tmp_path / "broken"
    shutil.copytree(src, folder)
    path, message = _break(folder, case)
    for command, source in [("eval", ["--data", tiny["root"] / "eval.npz"]), ("run", ["--images", tiny["root"] / "x.npy"])]:
        logits = tmp_path / f"{command}.npy"
        proc = run_ckpt(command, folder, *source, "--head", tiny["head"], "--save-logits", logits, check=2)
        assert proc.stderr.startswith(f"ckpt: error: {path}") and message in proc.stderr, proc.stderr
        assert not logits.exists()


# ------------------------------------------------------------------------------------------------------------------
# DINOv2-S/14


def test_dinov2_small_folders_give_identical_logits(tmp_path):
    """DINOv2-S W8A8 calibrated on 16 real images: the compressed-tensors folder (int8 Linears, a quarter of their F32
    bytes) and the dequantized folder give byte-identical `ckpt eval` logits on 32 Fashion-MNIST images."""
    from test_activation_quantization import DINO_FOLDER, REPO

    if not (DINO_FOLDER / "model.safetensors").is_file():
        pytest.skip(f"{DINO_FOLDER} is missing (fixtures/eval/generate.py --folder makes it)")
    head = REPO / "fixtures" / "eval" / "fmnist_head.safetensors"
    flags = ["--bits", 8, "--activation-bits", 8, "--calibration", REPO / "fixtures" / "eval" / "fmnist_calibration.npz",
             "--calibration-images", 16, "--head", head]
    for fmt in ("compressed-tensors", "dequantized"):
        run_ckpt("quantize", DINO_FOLDER, tmp_path / fmt, "--format", fmt, *flags, timeout=300)
    ct_bytes = (tmp_path / "compressed-tensors" / "model.safetensors").stat().st_size
    dq_bytes = (tmp_path / "dequantized" / "model.safetensors").stat().st_size
    linear_params = 12 * (4 * 384 * 384 + 2 * 384 * 1536)
    # 3 bytes saved per Linear weight (F32 → int8), less the per-row scales and zero points and the longer header.
    assert dq_bytes - ct_bytes > 2.9 * linear_params, (ct_bytes, dq_bytes)
    data = np.load(REPO / "fixtures" / "eval" / "fmnist_eval.npz")
    sub = tmp_path / "eval32.npz"
    np.savez(sub, images=data["images"][:32], labels=data["labels"][:32])
    results = {}
    for fmt in ("compressed-tensors", "dequantized"):
        (tmp_path / f"out-{fmt}").mkdir()
        results[fmt] = ckpt_logits(tmp_path / f"out-{fmt}", tmp_path / fmt, sub, head, command="eval")
    (a, _, da), (b, _, db) = results["compressed-tensors"], results["dequantized"]
    assert a.tobytes() == b.tobytes(), f"max logit difference {np.abs(a - b).max():.3g}"
    assert da["activation_quantization"] == db["activation_quantization"] and len(da["activation_quantization"]["sites"]) == 2 + 8 * 12
