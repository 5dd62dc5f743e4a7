#!/usr/bin/env python3
"""Exploration: which group-parameter rule gives the smallest layer-output error, with and without GPTQ?

For a sample of DINOv2-S Linear layers it hooks the input Gram H = X^T X over the 128 bundled calibration images
(transformers, one pass), quantizes each weight with several rules for the affine group parameters and prints the
output error tr((W - Q) H (W - Q)^T) relative to RTN's. Rules:
  rtn       MLX's min-max rule (bit-identical to mx.quantize)
  hqq       ckpt's HQQ: min-max scale, integer zero code from the half-quadratic Lp (p = 0.7) splitting
  hqq-cont  the reference HQQ: the same with a continuous zero point
  lsq       alternating weighted least squares of scale and bias from RTN's grid (continuous bias)
  lsq-int   the same with the zero kept an integer code (0.0 stays on the grid); scale continuous
  hqq-affine  ckpt's HQQ on the affine grid: the splitting with scale and bias both refitted (least squares of the
            shrunk target onto the codes), from RTN's parameters
  *-eq      equal weights under GPTQ instead of its column costs
Under GPTQ the weights of each column count with 1/U_kk^2 (GPTQ's cost of a rounding error there).

Usage: bench/explore/hqq_output_error.py [--bits 4] [--group 64] [--blocks 0,5,11]
"""
import argparse, re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / ".cache/dinov2/dinov2-small-224"
CALIBRATION = ROOT / "fixtures/eval/fmnist_calibration.npz"
CACHE = ROOT / ".cache/explore"


def preprocess(images, size=224):
    mean = np.array([0.485, 0.456, 0.406], np.float32)[None, :, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[None, :, None, None]
    k = size // images.shape[1]
    up = images.repeat(k, 1).repeat(k, 2).astype(np.float32) / np.float32(255)
    return np.ascontiguousarray((up[:, None] - mean) / std, np.float32)


def grams_and_weights(layers):
    path = CACHE / "grams.npz"
    if path.exists():
        z = np.load(path)
        if all(f"h:{n}" in z for n in layers):
            return {n: (z[f"w:{n}"], z[f"h:{n}"]) for n in layers}
    import torch
    from transformers import Dinov2Model
    model = Dinov2Model.from_pretrained(str(MODEL)).eval()
    modules = dict(model.named_modules())
    grams = {}

    def hook(name):
        def record(_m, inputs, _o):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double().numpy()
            grams[name] = grams.get(name, 0) + x.T @ x
        return record

    for n in layers:
        modules[n].register_forward_hook(hook(n))
    images = preprocess(np.load(CALIBRATION)["images"])
    with torch.no_grad():
        for s in range(0, len(images), 16):
            model(pixel_values=torch.from_numpy(images[s:s + 16]))
    out = {n: (modules[n].weight.detach().numpy().astype(np.float32), grams[n]) for n in layers}
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"w:{n}": w for n, (w, _) in out.items()}, **{f"h:{n}": h for n, (_, h) in out.items()})
    return out


# ---- group rules: wg (rows, g) float64, imp (g,) -> (scale, bias) per row, affine w = q*scale + bias

def rtn(wg, imp, n):
    lo, hi = wg.min(1), wg.max(1)
    use_min = np.abs(lo) > np.abs(hi)
    scale = np.maximum((hi - lo) / n, 1e-7)
    scale = np.where(use_min, scale, -scale)
    edge = np.where(use_min, lo, hi)
    q0 = np.rint(edge / scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(q0 != 0, edge / q0, scale)
    bias = np.where(q0 != 0, edge, 0)
    return scale, bias


def werr(wg, imp, s, b, n):
    q = np.clip(np.rint((wg - b[:, None]) / s[:, None]), 0, n)
    return ((wg - (q * s[:, None] + b[:, None])) ** 2 * imp).sum(1)


def hqq(wg, imp, n, continuous=False, iters=20, p=0.7, beta=10.0, kappa=1.01):
    lo, hi = wg.min(1), wg.max(1)
    sigma = n / np.maximum(hi - lo, 1e-12)
    zero = np.clip(np.rint(-lo * sigma), 0, n)
    best_zero, best_err = zero.copy(), np.full(len(wg), np.inf)
    active = np.ones(len(wg), bool)
    tot = imp.sum()
    for _ in range(iters):
        q = np.clip(np.rint(wg * sigma[:, None] + zero[:, None]), 0, n)
        e = wg - (q - zero[:, None]) / sigma[:, None]
        a = np.abs(e)
        err = (a * imp).sum(1) / tot
        improved = active & (err < best_err)
        best_err = np.where(improved, err, best_err)
        best_zero = np.where(improved, zero, best_zero)
        active &= improved
        with np.errstate(divide="ignore"):
            shrunk = np.maximum(0, a - np.power(a, p - 1) / beta)
        we = np.sign(e) * shrunk
        z = ((q - (wg - we) * sigma[:, None]) * imp).sum(1) / tot
        if not continuous:
            z = np.clip(np.rint(z), 0, n)
        active &= z != best_zero
        zero = np.where(active, z, zero)
        beta *= kappa
        if not active.any():
            break
    s = 1 / sigma
    return s, -best_zero * s


def hqq_affine(wg, imp, n, iters=20, p=0.7, beta=10.0, kappa=1.01):
    """Half-quadratic splitting with both affine parameters free: codes, Lp shrinkage of the error, then the
    weighted least-squares (scale, bias) of the shrunk target W - W_e onto the codes."""
    s, b = rtn(wg, imp, n)
    best_s, best_b, best_err = s.copy(), b.copy(), np.full(len(wg), np.inf)
    tot = imp.sum()
    active = np.ones(len(wg), bool)
    for _ in range(iters):
        q = np.clip(np.rint((wg - b[:, None]) / s[:, None]), 0, n)
        e = wg - (q * s[:, None] + b[:, None])
        a = np.abs(e)
        err = (a * imp).sum(1) / tot
        improved = active & (err < best_err)
        best_err = np.where(improved, err, best_err)
        best_s = np.where(improved, s, best_s)
        best_b = np.where(improved, b, best_b)
        active &= improved
        if not active.any():
            break
        with np.errstate(divide="ignore"):
            shrunk = np.maximum(0, a - np.power(a, p - 1) / beta)
        t = wg - np.sign(e) * shrunk
        sw, sq, sqq = tot, (q * imp).sum(1), (q * q * imp).sum(1)
        sx, sqx = (t * imp).sum(1), (q * t * imp).sum(1)
        det = sw * sqq - sq * sq
        ok = active & (det > 1e-30)
        s = np.where(ok, (sw * sqx - sq * sx) / np.where(ok, det, 1), s)
        b = np.where(ok, (sx - s * sq) / sw, b)
        beta *= kappa
    return best_s, best_b


def lsq(wg, imp, n, integer_zero=False, iters=10):
    s, b = rtn(wg, imp, n)
    best = (s.copy(), b.copy(), werr(wg, imp, s, b, n))
    for _ in range(iters):
        q = np.clip(np.rint((wg - b[:, None]) / s[:, None]), 0, n)
        if integer_zero:
            z = np.rint(-b / s)
            c = q - z[:, None]
            den = (c * c * imp).sum(1)
            s = np.where(den > 0, (wg * c * imp).sum(1) / np.maximum(den, 1e-30), s)
            b = -z * s
        else:
            sw, sq, sqq = imp.sum(), (q * imp).sum(1), (q * q * imp).sum(1)
            sx, sqx = (wg * imp).sum(1), (q * wg * imp).sum(1)
            det = sw * sqq - sq * sq
            ok = det > 1e-30
            s = np.where(ok, (sw * sqx - sq * sx) / np.where(ok, det, 1), s)
            b = np.where(ok, (sx - s * sq) / sw, b)
        e = werr(wg, imp, s, b, n)
        better = e < best[2]
        best = (np.where(better, s, best[0]), np.where(better, b, best[1]), np.where(better, e, best[2]))
    return best[0], best[1]


RULES = {
    "rtn": rtn,
    "hqq": lambda w, i, n: hqq(w, i, n),
    "hqq-cont": lambda w, i, n: hqq(w, i, n, continuous=True),
    "lsq": lambda w, i, n: lsq(w, i, n),
    "lsq-int": lambda w, i, n: lsq(w, i, n, integer_zero=True),
    "hqq-affine": hqq_affine,
    "hqq-affine-eq": lambda w, i, n: hqq_affine(w, np.ones_like(i), n),
    "hqq-cont-eq": lambda w, i, n: hqq(w, np.ones_like(i), n, continuous=True),
    "hqq-cont-p1": lambda w, i, n: hqq(w, i, n, continuous=True, p=1.0),
}


def quantize_plain(w, rule, bits, group):
    n = 2**bits - 1
    out = np.empty_like(w)
    for g0 in range(0, w.shape[1], group):
        wg = w[:, g0:g0 + group]
        s, b = rule(wg, np.ones(group), n)
        q = np.clip(np.rint((wg - b[:, None]) / s[:, None]), 0, n)
        out[:, g0:g0 + group] = q * s[:, None] + b[:, None]
    return out


def damped(gram):
    """GPTQ's damped Gram: a dead input gets a unit diagonal, then 1 % of the mean diagonal is added."""
    h = gram.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    return h + 0.01 * np.mean(np.diag(h)) * np.eye(len(h))


def act_order_factor(gram):
    """GPTQ's visiting order (descending diagonal), its inverse, and U with (P·damped(H)·P^T)^-1 = U^T U."""
    h = damped(gram)
    order = np.argsort(-np.diag(h), kind="stable")
    h = h[np.ix_(order, order)]
    return order, np.argsort(order), np.linalg.cholesky(np.linalg.inv(h)).T


def quantize_gptq(w, gram, rule, bits, group):
    """GPTQ with act-order (descending diag), 1 % damping, contiguous groups, parameters at first touch."""
    cols = w.shape[1]
    n = 2**bits - 1
    order, position, u = act_order_factor(gram)
    cost = 1 / np.diag(u) ** 2
    work, out = w[:, order].copy(), np.empty_like(w)
    params = {}
    for k in range(cols):
        c = order[k]
        g = c // group
        if g not in params:
            members = position[g * group:(g + 1) * group]
            params[g] = rule(work[:, members], cost[members], n)
        s, b = params[g]
        q = np.clip(np.rint((work[:, k] - b) / s), 0, n)
        out[:, c] = q * s + b
        err = (work[:, k] - out[:, c]) / u[k, k]
        work[:, k + 1:] -= np.outer(err, u[k, k + 1:])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--blocks", default="0,5,11")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--gptq-only", action="store_true")
    args = ap.parse_args()
    kinds = ["attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"]
    layers = [f"encoder.layer.{b}.{k}" for b in map(int, args.blocks.split(",")) for k in kinds]
    data = grams_and_weights(layers)
    rules = args.rules.split(",")
    print(f"W{args.bits} g{args.group}: output error relative to RTN's (plain | GPTQ)")
    print(f"{'layer':34}" + "".join(f"{r:>20}" for r in rules))
    totals = {r: [0.0, 0.0] for r in rules}
    for name in layers:
        w, h = data[name]
        w = w.astype(np.float64)
        row = []
        base = None
        for r in rules:
            qp = w if args.gptq_only else quantize_plain(w, RULES[r], args.bits, args.group)
            qg = quantize_gptq(w, h, RULES[r], args.bits, args.group)
            ep = np.einsum("rc,cd,rd->", w - qp, h, w - qp) + 1e-30
            eg = np.einsum("rc,cd,rd->", w - qg, h, w - qg)
            if base is None:
                base = (ep, eg)
            totals[r][0] += np.log(ep / base[0])
            totals[r][1] += np.log(eg / base[1])
            row.append(f"{ep / base[0]:9.3f} |{eg / base[1]:8.3f}")
        print(f"{name:34}" + "".join(f"{c:>20}" for c in row), flush=True)
    print(f"{'geometric mean':34}" + "".join(f"{np.exp(totals[r][0] / len(layers)):9.3f} |{np.exp(totals[r][1] / len(layers)):8.3f}" .rjust(20) for r in rules))


if __name__ == "__main__":
    main()
