#!/usr/bin/env python3
"""Exploration (not a product feature, not run by CI): can a prior on each Linear layer's input fix what 4-bit weight
quantization does to the bundled DINOv2-S probe?  It writes dequantized variants of the model with numpy and scores
them with `ckpt eval` (first --limit images; accuracy, top-1 agreement and KL against F32), like bench/quality.py.

  stats MODE      per-channel mean and E[x^2] of every Linear input over 32 inputs, through transformers' Dinov2Model
                  (PyTorch hooks).  MODE: real (Fashion-MNIST test[900:932], outside the first 500 used for scoring),
                  noise (N(0,1) in normalised space), smooth (14x14 noise upsampled), black (constant black), mix
                  (dim random blocks); writes .cache/explore/stats-MODE.npz
  run NAME [flags] W4 g64 MLX-rule RTN (float64 re-implementation, equal to ckpt's on this model) plus:
                  --fold        fold each LayerNorm's gamma/beta into the following Linear, then quantize
                  --bias-corr   b' = b + (W - W_q) E[x]  (E[x] from --stats, else the LayerNorm beta prior)
                  --wclip       per-group clip factor 1.00..0.40 minimising sum_j h_j (w - w_q)^2, h = E[x^2]
                  --stats MODE  use .cache/explore/stats-MODE.npz instead of the LayerNorm prior
                  --only KINDS  comma list of q,k,v,o,fc1,fc2 to quantize (default all)
Usage: .venv/bin/python bench/explore/weight_priors.py stats real
       .venv/bin/python bench/explore/weight_priors.py run bc-real --bias-corr --stats real
"""
import argparse, json, os, shutil, subprocess
from math import erf
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / ".cache/dinov2/dinov2-small-224"
CKPT = os.environ.get("CKPT", str(ROOT / ".build/release/ckpt"))
HEAD, DATA = ROOT / "fixtures/eval/fmnist_head.safetensors", ROOT / "fixtures/eval/fmnist_eval.npz"
WORK = ROOT / ".cache/explore"
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
KINDS = dict(q="attention.attention.query", k="attention.attention.key", v="attention.attention.value",
             o="attention.output.dense", fc1="mlp.fc1", fc2="mlp.fc2")


def synthetic_inputs(mode: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    norm = lambda u: (u - MEAN[None, :, None, None]) / STD[None, :, None, None]
    if mode == "real":
        imgs = np.load(DATA)["images"][900:932]
        return norm(np.repeat(np.repeat(imgs, 8, 1), 8, 2).astype(np.float32)[:, None] / 255)
    if mode == "noise":
        return rng.standard_normal((32, 3, 224, 224)).astype(np.float32)
    if mode == "smooth":
        return np.repeat(np.repeat(rng.standard_normal((32, 3, 14, 14)).astype(np.float32), 16, 2), 16, 3)
    if mode == "black":
        return norm(np.zeros((32, 3, 224, 224), np.float32))
    if mode == "mix":
        level = rng.uniform(0, 1, (32, 3, 1, 1)).astype(np.float32)
        blocks = rng.uniform(0, 1, (32, 1, 28, 28)).astype(np.float32) ** 3
        return norm(np.clip(level * 0.3 + np.repeat(np.repeat(blocks, 8, 2), 8, 3), 0, 1))
    raise SystemExit(f"unknown mode {mode}")


def collect_stats(mode: str) -> None:
    import torch
    from transformers import Dinov2Model
    torch.set_num_threads(1)
    model = Dinov2Model.from_pretrained(str(MODEL)).eval()
    stats = {}

    def hook(name):
        def record(_module, inputs, _output):
            a = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            stats[f"{name}.mean"], stats[f"{name}.sq"] = a.mean(0).numpy(), (a ** 2).mean(0).numpy()
        return record
    for i, layer in enumerate(model.encoder.layer):  # q/k/v share their input
        layer.attention.q_proj.register_forward_hook(hook(f"{i}.q"))
        layer.attention.o_proj.register_forward_hook(hook(f"{i}.o"))
        layer.mlp.fc1.register_forward_hook(hook(f"{i}.fc1"))
        layer.mlp.fc2.register_forward_hook(hook(f"{i}.fc2"))
    with torch.no_grad():
        model(pixel_values=torch.from_numpy(np.ascontiguousarray(synthetic_inputs(mode))))
    WORK.mkdir(parents=True, exist_ok=True)
    np.savez(WORK / f"stats-{mode}.npz", **stats)
    print(f"wrote {WORK / f'stats-{mode}.npz'}")


def rtn(w, bits, group, clip=1.0):
    """MLX's zero-exact affine rule in float64."""
    rows, cols = w.shape
    x = w.reshape(rows, cols // group, group).astype(np.float64)
    lo, hi = x.min(2, keepdims=True) * clip, x.max(2, keepdims=True) * clip
    n = 2 ** bits - 1
    use_min = np.abs(lo) > np.abs(hi)
    scale = np.maximum((hi - lo) / n, 1e-7)
    scale = np.where(use_min, scale, -scale)
    edge = np.where(use_min, lo, hi)
    q0 = np.round(edge / scale)
    scale = np.where(q0 != 0, edge / np.where(q0 == 0, 1, q0), scale)
    bias = np.where(q0 != 0, edge, 0)
    q = np.clip(np.round((x - bias) / scale), 0, n)
    return (q * scale + bias).reshape(rows, cols)


def weighted_clip(w, bits, group, h):
    rows, cols = w.shape
    best, best_err = None, None
    for a in np.arange(1.0, 0.39, -0.02):
        q = rtn(w, bits, group, a)
        err = (((w - q).reshape(rows, cols // group, group)) ** 2 * h.reshape(1, cols // group, group)).sum(2)
        if best is None:
            best, best_err = q, err
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = np.where(np.repeat(better, group, axis=1), q, best)
    return best


def gelu_moments(mu, sd, n=64):
    """E[gelu(z)], E[gelu(z)^2] for z ~ N(mu, sd^2) by Gauss-Hermite quadrature."""
    x, weights = np.polynomial.hermite_e.hermegauss(n)
    weights = weights / weights.sum()
    z = mu[:, None] + sd[:, None] * x[None, :]
    g = 0.5 * z * (1 + np.vectorize(erf)(z / np.sqrt(2)))
    return (g * weights).sum(1), (g ** 2 * weights).sum(1)


def evaluate(folder, limit, logits_path):
    out = subprocess.run([CKPT, "eval", str(folder), "--head", str(HEAD), "--data", str(DATA), "--json",
                          "--save-logits", str(logits_path), "--limit", str(limit)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["accuracy"], np.load(logits_path)


def log_softmax(x):
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def run(a) -> None:
    stats = np.load(WORK / f"stats-{a.stats}.npz") if a.stats else None
    only = set(a.only.split(",")) if a.only else set(KINDS)
    t = {k: v.astype(np.float64) for k, v in load_file(MODEL / "model.safetensors").items()}
    for i in range(12):
        p = f"encoder.layer.{i}."
        priors = {}  # kind -> (E[x], E[x^2], Var[x]) of its input under the LayerNorm prior (normalised x ~ N(0, 1))
        for norm, targets in (("norm1", ("q", "k", "v")), ("norm2", ("fc1",))):
            gamma, beta = t[p + norm + ".weight"], t[p + norm + ".bias"]
            if a.fold:
                for k in targets:
                    t[p + KINDS[k] + ".bias"] = t[p + KINDS[k] + ".bias"] + t[p + KINDS[k] + ".weight"] @ beta
                    t[p + KINDS[k] + ".weight"] = t[p + KINDS[k] + ".weight"] * gamma[None, :]
                t[p + norm + ".weight"], t[p + norm + ".bias"] = np.ones_like(gamma), np.zeros_like(beta)
                gamma, beta = np.ones_like(gamma), np.zeros_like(beta)
            for k in targets:
                priors[k] = (beta, gamma ** 2 + beta ** 2, gamma ** 2)
        w1, b1 = t[p + KINDS["fc1"] + ".weight"], t[p + KINDS["fc1"] + ".bias"]
        m1, m2 = gelu_moments(w1 @ priors["fc1"][0] + b1, np.sqrt((w1 ** 2) @ priors["fc1"][2]))
        priors["fc2"] = (m1, m2, m2 - m1 ** 2)
        wv, bv = t[p + KINDS["v"] + ".weight"], t[p + KINDS["v"] + ".bias"]
        mean_v, var_v = wv @ priors["v"][0] + bv, (wv ** 2) @ priors["v"][2]
        priors["o"] = (mean_v, mean_v ** 2 + var_v, var_v)
        for k in KINDS:
            if k not in only:
                continue
            w = t[p + KINDS[k] + ".weight"]
            mean_x, h, _ = priors[k]
            if stats is not None:
                site = "q" if k in ("q", "k", "v") else k
                mean_x, h = stats[f"{i}.{site}.mean"], stats[f"{i}.{site}.sq"]
            q = weighted_clip(w, 4, 64, h) if a.wclip else rtn(w.astype(np.float32), 4, 64)
            if a.bias_corr:
                t[p + KINDS[k] + ".bias"] = t[p + KINDS[k] + ".bias"] + (w - q) @ mean_x
            t[p + KINDS[k] + ".weight"] = q
    out = WORK / "model"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in ("config.json", "preprocessor_config.json"):
        shutil.copy(MODEL / f, out / f)
    save_file({k: v.astype(np.float32) for k, v in t.items()}, str(out / "model.safetensors"))
    ref_path = WORK / f"f32-{a.limit}.npy"
    if not ref_path.exists():
        evaluate(MODEL, a.limit, ref_path)
    ref = np.load(ref_path)
    acc, logits = evaluate(out, a.limit, WORK / "logits.npy")
    lp, lq = log_softmax(ref), log_softmax(logits)
    kl = float((np.exp(lp) * (lp - lq)).sum(1).mean())
    print(f"{a.name}: accuracy {100 * acc:.1f}  agreement {100 * np.mean(logits.argmax(1) == ref.argmax(1)):.1f}  KL {kl:.3f}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stats")
    s.add_argument("mode", choices=["real", "noise", "smooth", "black", "mix"])
    r = sub.add_parser("run")
    r.add_argument("name")
    r.add_argument("--fold", action="store_true")
    r.add_argument("--bias-corr", action="store_true")
    r.add_argument("--wclip", action="store_true")
    r.add_argument("--stats")
    r.add_argument("--only")
    r.add_argument("--limit", type=int, default=500)
    a = ap.parse_args()
    collect_stats(a.mode) if a.command == "stats" else run(a)


if __name__ == "__main__":
    main()
