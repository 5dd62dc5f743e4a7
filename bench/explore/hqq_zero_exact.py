#!/usr/bin/env python3
"""Exploration (not run by CI): does keeping 0.0 exactly representable rescue data-free affine HQQ at low bits?

ckpt's affine HQQ (`--method hqq`, mlx/dequantized grid) refits scale and bias freely. MLX's min-max rule puts 0.0
on a code; a free bias does not, so every near-zero weight picks up an offset, and the few input channels with
E[x^2] ~ 1e4 in DINOv2 multiply it. This prototype (numpy, data-free, groups along the input dimension) scores
  rtn          MLX's min-max rule (what `--method rtn` writes)
  hqq          the affine HQQ of ckpt (least squares of scale and bias; shrinkage; keep the least mean |e|)
  hqq-zero     the same iteration with the bias tied to an integer zero code, b = -z*s: each step refits the
               unconstrained least squares, rounds its zero -b/s to a code z, and refits s alone for that z
on the tensors `ckpt quantize --format dequantized` selects, writes each as a dequantized model and scores it with
`ckpt eval` (accuracy, top-1 agreement with F32, mean KL), like bench/quality.py.

Result (2026-12-07, first 500 eval images, F32 83.0; cells accuracy / agreement / KL, mean relative weight error):
  W3 g64  rtn 51.2 / 53.8 / 1.365, 0.0420   hqq 50.2 / 49.2 / 2.464, 0.0345   hqq-zero 45.0 / 48.6 / 2.486, 0.0369
  W4 g64  rtn 69.2 / 77.8 / 0.399, 0.0096   hqq 71.6 / 77.0 / 0.411, 0.0085   hqq-zero 72.6 / 80.4 / 0.319, 0.0091
The rtn and hqq rows equal ckpt's own `--method rtn|hqq` cells (README), so this numpy port reproduces ckpt's affine
HQQ. An exact zero helps at W4 and hurts at W3: the bias offset is not what costs HQQ its W3 accuracy, and ckpt
keeps the free bias.

Usage: .venv/bin/python bench/explore/hqq_zero_exact.py [--settings 3:64,4:64] [--limit 500] [--variants rtn,hqq,hqq-zero]
"""
import argparse, json, subprocess, sys, tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import quality  # noqa: E402

P, BETA, KAPPA, ITERATIONS = 0.7, 10.0, 1.01, 20


def mlx_range(lo, hi, max_code):
    """MLX's min-max rule per group (float32): the edge of larger magnitude lands on a code; 0.0 becomes exact."""
    use_min = np.abs(lo) > np.abs(hi)
    scale = np.maximum((hi - lo) / max_code, np.float32(1e-7))
    scale = np.where(use_min, scale, -scale).astype(np.float32)
    edge = np.where(use_min, lo, hi)
    q0 = np.rint(edge / scale)
    safe = np.where(q0 != 0, q0, 1)
    return np.where(q0 != 0, edge / safe, scale).astype(np.float32), np.where(q0 != 0, edge, 0).astype(np.float32)


def codes(w, s, b, max_code):
    return np.clip(np.rint((w - b[:, None]) / s[:, None]), 0, max_code)


def hqq(w, bits, zero_exact):
    """w: [groups, g] float32. Returns the dequantized groups."""
    max_code = float(2 ** bits - 1)
    s, b = mlx_range(w.min(1), w.max(1), max_code)
    best_s, best_b = s.copy(), b.copy()
    best_err = np.full(len(w), np.inf, dtype=np.float32)
    active = w.max(1) > w.min(1)
    beta = BETA
    for _ in range(ITERATIONS):
        q = codes(w, s, b, max_code)
        e = w - (q * s[:, None] + b[:, None])
        a = np.abs(e)
        with np.errstate(divide="ignore"):
            shrunk = np.maximum(0, a - np.power(a, P - 1) / beta)
        t = w - np.sign(e) * shrunk
        err = a.mean(1)
        improved = active & (err < best_err)
        best_err = np.where(improved, err, best_err)
        best_s, best_b = np.where(improved, s, best_s), np.where(improved, b, best_b)
        active = improved
        n = w.shape[1]
        sq, sqq, st, sqt = q.sum(1), (q * q).sum(1), t.sum(1), (q * t).sum(1)
        det = n * sqq - sq * sq
        ok = det > 1e-12 * n * sqq
        new_s = np.where(ok, (n * sqt - sq * st) / np.where(ok, det, 1), s)
        new_b = np.where(ok, (st - new_s * sq) / n, b)
        if zero_exact:
            # zero code of the unconstrained fit, then the scale alone for that integer zero: t ~ s (q - z)
            nz = np.where(new_s != 0, new_s, 1)
            z = np.clip(np.rint(-new_b / nz), 0, max_code)
            d = q - z[:, None]
            dd = (d * d).sum(1)
            fit = (d * t).sum(1) / np.where(dd > 0, dd, 1)
            good = ok & (dd > 0) & (fit != 0)
            new_s = np.where(good, fit, s)
            new_b = np.where(good, -z * new_s, b)
        active &= np.isfinite(new_s) & (new_s != 0)
        s = np.where(active, new_s, s).astype(np.float32)
        b = np.where(active, new_b, b).astype(np.float32)
        beta *= KAPPA
        if not active.any():
            break
    q = codes(w, best_s, best_b, max_code)
    return (q * best_s[:, None] + best_b[:, None]).astype(np.float32)


def dequantized(w, bits, group, variant):
    flat = w.reshape(w.shape[0], -1).astype(np.float32)
    groups = flat.reshape(-1, group)
    if variant == "rtn":
        s, b = mlx_range(groups.min(1), groups.max(1), float(2 ** bits - 1))
        out = codes(groups, s, b, float(2 ** bits - 1)) * s[:, None] + b[:, None]
    else:
        out = hqq(groups, bits, zero_exact=variant == "hqq-zero")
    return out.astype(np.float32).reshape(w.shape)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default="3:64,4:64")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--variants", default="rtn,hqq,hqq-zero")
    a = p.parse_args()
    original = load_file(str(quality.MODEL / "model.safetensors"))
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
        tmp = Path(tmp)
        quality.reference(tmp / "f32.npy", a.limit)
        ref = np.load(tmp / "f32.npy")
        for setting in a.settings.split(","):
            bits, group = map(int, setting.split(":"))
            report = json.loads(subprocess.run(
                [str(quality.CKPT), "quantize", str(quality.MODEL), str(tmp / "probe"), "--format", "dequantized", "--bits", str(bits),
                 "--group-size", str(group), "--json"], check=True, capture_output=True, text=True).stdout)
            names = [t["name"] for t in report["tensors"] if t["quantized"]]
            for variant in a.variants.split(","):
                out = tmp / f"w{bits}g{group}-{variant}"
                out.mkdir()
                for extra in ("config.json", "preprocessor_config.json"):
                    if (quality.MODEL / extra).exists():
                        (out / extra).write_bytes((quality.MODEL / extra).read_bytes())
                tensors = dict(original)
                errors = []
                for name in names:
                    tensors[name] = dequantized(original[name], bits, group, variant)
                    w = original[name].astype(np.float64)
                    errors.append(np.sum((w - tensors[name]) ** 2) / np.sum(w ** 2))
                save_file(tensors, str(out / "model.safetensors"))
                result = quality.evaluate(out, tmp / "logits.npy", a.limit)
                agreement, kl = quality.compare(ref, np.load(tmp / "logits.npy"))
                print(json.dumps({"setting": f"W{bits} g{group}", "variant": variant, "accuracy": result["accuracy"],
                                  "agreement": agreement, "kl": kl, "relative_weight_error": float(np.mean(errors))}), flush=True)


if __name__ == "__main__":
    main()
