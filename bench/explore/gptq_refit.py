#!/usr/bin/env python3
"""Exploration (not run by CI): does refitting each row's group scales and biases to the layer output error, once
GPTQ has chosen the codes, lower that error?  For the 12 Linears of bench/explore/hqq_output_error.py (blocks 0, 5,
11; Grams over the 128 bundled calibration images through transformers) it runs float64 GPTQ (act-order, 1 %
damping, parameters at first touch) with MLX's RTN rule and with ckpt's affine HQQ, then solves, per row, the least
squares of (w - w_hat)^T H (w - w_hat) over all the row's (scale, bias) pairs with the codes fixed. Prints each
layer's output error relative to RTN + GPTQ's, and the geometric mean.

  --alternate   also alternate: GPTQ again with the refitted parameters fixed, refit again (three rounds)

This goes with the `--refit` option of commit f2b358d (reverted in the commit after it): the layer errors fall by ~8 %, but the
end-to-end KL and accuracy of the model got worse (formats/quantization.md, "Refitting the group parameters").

Usage: .venv/bin/python bench/explore/gptq_refit.py [--bits 4] [--group 64] [--alternate]
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hqq_output_error as base  # noqa: E402


def gptq(w, gram, bits, group, rule=None, fixed=None):
    """GPTQ in act-order; the group parameters from `rule` at first touch, or `fixed` (scales, biases)."""
    cols, n = w.shape[1], 2**bits - 1
    order, position, u = base.act_order_factor(gram)
    cost = 1 / np.diag(u) ** 2
    work, codes = w[:, order].copy(), np.empty_like(w)
    scales, biases = (fixed[0].copy(), fixed[1].copy()) if fixed else (np.zeros((len(w), cols // group)), np.zeros((len(w), cols // group)))
    seen = set()
    for k in range(cols):
        c = order[k]
        g = c // group
        if fixed is None and g not in seen:
            seen.add(g)
            members = position[g * group:(g + 1) * group]
            scales[:, g], biases[:, g] = rule(work[:, members], cost[members], n)
        s, b = scales[:, g], biases[:, g]
        q = np.clip(np.rint((work[:, k] - b) / s), 0, n)
        codes[:, c] = q
        err = (work[:, k] - (q * s + b)) / u[k, k]
        work[:, k + 1:] -= np.outer(err, u[k, k + 1:])
    return codes, scales, biases


def refit(w, gram, codes, scales, biases, group):
    cols, groups = w.shape[1], w.shape[1] // group
    h = base.damped(gram)
    member = np.zeros((cols, groups))
    member[np.arange(cols), np.arange(cols) // group] = 1
    scales, biases = scales.copy(), biases.copy()
    for r in range(len(w)):
        design = np.concatenate([member * codes[r][:, None], member], 1)
        a = design.T @ h @ design
        a += 1e-9 * np.diag(np.diag(a))
        theta = np.linalg.solve(a, design.T @ h @ w[r])
        scales[r], biases[r] = theta[:groups], theta[groups:]
    return scales, biases


def values(codes, scales, biases, group):
    return codes * np.repeat(scales, group, 1) + np.repeat(biases, group, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--alternate", action="store_true")
    a = ap.parse_args()
    kinds = ["attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"]
    layers = [f"encoder.layer.{b}.{k}" for b in (0, 5, 11) for k in kinds]
    data = base.grams_and_weights(layers)
    logs = {}
    for name in layers:
        w, gram = data[name]
        w = w.astype(np.float64)
        error = lambda x: np.einsum("rc,cd,rd->", w - x, gram, w - x)
        result = {}
        for rule in ("rtn", "hqq-affine"):
            codes, s, b = gptq(w, gram, a.bits, a.group, rule=base.RULES[rule])
            result[rule] = error(values(codes, s, b, a.group))
            s, b = refit(w, gram, codes, s, b, a.group)
            result[rule + "+refit"] = error(values(codes, s, b, a.group))
            if a.alternate and rule == "hqq-affine":
                for round_ in range(1, 3):
                    codes, s, b = gptq(w, gram, a.bits, a.group, fixed=(s, b))
                    result[f"{rule} gptq{round_}"] = error(values(codes, s, b, a.group))
                    s, b = refit(w, gram, codes, s, b, a.group)
                    result[f"{rule} refit{round_}"] = error(values(codes, s, b, a.group))
        print(f"{name:34}" + "  ".join(f"{k} {v / result['rtn']:.3f}" for k, v in result.items()), flush=True)
        for k, v in result.items():
            logs.setdefault(k, []).append(np.log(v / result["rtn"]))
    print(f"{'geometric mean':34}" + "  ".join(f"{k} {np.exp(np.mean(v)):.3f}" for k, v in logs.items()))


if __name__ == "__main__":
    main()
