#!/usr/bin/env python3
"""Exploration (not run by CI): ckpt's --method hqq against the published HQQ library on the bundled DINOv2-S probe.

Both quantize the same tensors (the ones `ckpt quantize --format dequantized` selects, conv weights flattened to
[out, in*kh*kw]) weight-only in groups along the input dimension, without calibration data; each result is written
as a dequantized safetensors copy of the model and scored with `ckpt eval` like bench/quality.py (accuracy, top-1
agreement with F32, mean KL(F32 || quantized)). The library side is hqq's own
`Quantizer.quantize(W, nbits, group_size, axis=1, optimize=True, round_zero=False)` with its default optimiser
(`optimize_weights_proximal`, the Lp p = 0.7 half-quadratic solver), dequantized in float32; `--library-rtn` adds
its `optimize=False` min-max rounding, `--library-variants` its other optimisers (`optimize_weights_proximal_v2`,
`optimize_weights_proximal_slow`) and its `axis=0` grouping (64 rows of one input column, which MLX cannot store).

hqq needs torch; install it next to the project's CPU torch without its other dependencies:
  DISABLE_CUDA=1 .venv/bin/pip install --no-deps hqq==0.2.8.post1 termcolor   (its setup.py builds CUDA kernels otherwise)
Usage: .venv/bin/python bench/explore/hqq_library.py [--settings 4:64,3:64,2:64] [--limit 500] [--library-rtn]
       [--library-variants]
"""
import argparse, json, subprocess, sys, tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import quality  # noqa: E402  (evaluate, reference, compare, CKPT, MODEL)


def library_dequantized(w: np.ndarray, bits: int, group: int, optimize: bool, optimiser: str = "proximal", axis: int = 1) -> np.ndarray:
    import torch
    from hqq.core import optimize as solvers
    from hqq.core.quantize import Quantizer

    Quantizer.optimize_weights = getattr(solvers, "optimize_weights_" + optimiser)
    t = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(w.shape[0], -1)
    packed, meta = Quantizer.quantize(t, nbits=bits, channel_wise=True, group_size=group, optimize=optimize,
                                      round_zero=False, axis=axis, bitpack=True, compute_dtype=torch.float32,
                                      view_as_float=False, device="cpu")
    meta["compute_dtype"] = torch.float32  # dequantize() would return float16 otherwise
    return Quantizer.dequantize(packed, meta).reshape(w.shape).numpy().astype(w.dtype)


def score(model_dir: Path, ref: np.ndarray, limit: int, tmp: Path) -> dict:
    logits_path = tmp / "logits.npy"
    result = quality.evaluate(model_dir, logits_path, limit)
    agreement, kl = quality.compare(ref, np.load(logits_path))
    return {"accuracy": result["accuracy"], "agreement": agreement, "kl": kl}


def relative_error(original: dict, changed: dict, names: list[str]) -> float:
    """Mean over the quantized tensors of ||W - W_hat||^2 / ||W||^2."""
    return float(np.mean([np.sum((original[n].astype(np.float64) - changed[n]) ** 2) / np.sum(original[n].astype(np.float64) ** 2)
                          for n in names]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default="4:64,3:64,2:64")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--library-rtn", action="store_true", help="also score hqq's optimize=False rounding")
    p.add_argument("--library-variants", action="store_true", help="also score hqq's v2 and slow optimisers and axis=0")
    a = p.parse_args()
    model_file = quality.MODEL / "model.safetensors"
    original = load_file(str(model_file))
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
        tmp = Path(tmp)
        quality.reference(tmp / "f32.npy", a.limit)
        ref = np.load(tmp / "f32.npy")
        rows = []
        for setting in a.settings.split(","):
            bits, group = map(int, setting.split(":"))
            variants = {}
            work = tmp / f"w{bits}g{group}"
            work.mkdir()
            for method in ("rtn", "hqq"):
                out = work / f"ckpt-{method}"
                report = json.loads(subprocess.run(
                    [str(quality.CKPT), "quantize", str(quality.MODEL), str(out), "--format", "dequantized", "--bits", str(bits),
                     "--group-size", str(group), "--method", method, "--json"], check=True, capture_output=True, text=True).stdout)
                names = [t["name"] for t in report["tensors"] if t["quantized"]]
                variants[f"ckpt {method}"] = (out, names)
            library = [("hqq library", True, "proximal", 1)]
            if a.library_rtn:
                library.append(("hqq library, optimize=False", False, "proximal", 1))
            if a.library_variants:
                library += [("hqq library, proximal_v2", True, "proximal_v2", 1), ("hqq library, proximal_slow", True, "proximal_slow", 1),
                            ("hqq library, axis=0", True, "proximal", 0)]
            for label, optimize, optimiser, axis in library:
                out = work / label.replace(" ", "-").replace(",", "").replace("=", "-")
                out.mkdir()
                for extra in ("config.json", "preprocessor_config.json"):
                    if (quality.MODEL / extra).exists():
                        (out / extra).write_bytes((quality.MODEL / extra).read_bytes())
                tensors = dict(original)
                for name in names:
                    tensors[name] = library_dequantized(original[name], bits, group, optimize, optimiser, axis)
                save_file(tensors, str(out / "model.safetensors"))
                variants[label] = (out, names)
            for label, (out, names) in variants.items():
                row = {"setting": f"W{bits} g{group}", "variant": label, **score(out, ref, a.limit, tmp),
                       "relative_weight_error": relative_error(original, load_file(str(out / "model.safetensors")), names)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        print("\n| setting | variant | accuracy % | agreement % | KL | mean relative weight error |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['setting']} | {r['variant']} | {100 * r['accuracy']:.1f} | {100 * r['agreement']:.1f} | {r['kl']:.3f} | "
                  f"{r['relative_weight_error']:.4f} |")


if __name__ == "__main__":
    main()
