#!/usr/bin/env python3
"""Exploration (not the product): do Hadamard rotations make DINOv2-S quantizable at W4A4 / W8A8?

A self-contained PyTorch forward of the bundled DINOv2-S + Fashion-MNIST head with fake quantization at RepQ-ViT's
sites, calibrated by min–max on N calibration images (post-LayerNorm sites per channel, which is what RepQ-ViT's
fold gives; log√2 after softmax with Δ = 1; every other site per tensor; weights per output channel, min–max RTN).
Transforms, all exact in float (checked: logits equal the original's to ~1e-5):
  residual  centre every write into the residual stream, fold LayerScale into proj/fc2 and every LayerNorm's γ/β into
            the Linears it feeds (the head for the final norm), then rotate the stream by Q = H·D·Hᵀ (H a normalised
            384-point Hadamard, D random signs): Q fixes the all-ones vector, so the stream stays zero-mean and the
            plain LayerNorms (γ = 1, β = 0) still compute the same thing — a standard ViT file, no new op.
  value     per-head 64-point Hadamard on v (value rows) and the projection's input columns: folded, no new op.
  fc2       an online 1536-point Hadamard on fc2's input (a runtime op: uH, with W_fc2 ← W_fc2·H).
Usage: bench/explore/rotation.py [--bits W:A,...] [--transforms none,residual,...] [--limit N] [--calibration N]
"""
import argparse, math, sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
DTYPE = torch.float64
torch.set_num_threads(2)


def hadamard(n):
    """A Hadamard matrix of order n = 2^k or 12·2^k (Paley 12 ⊗ Sylvester), first column all ones."""
    if n % 12 == 0 and (n // 12) & (n // 12 - 1) == 0:
        q = 11
        residues = {(i * i) % q for i in range(1, q)}
        chi = lambda a: 0 if a % q == 0 else (1 if a % q in residues else -1)  # noqa: E731
        jac = np.array([[chi(j - i) for j in range(q)] for i in range(q)], dtype=np.float64)
        s = np.zeros((12, 12))
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = jac
        h = np.eye(12) + s
        base, rest = h * h[:, :1], n // 12  # rows signed so the first column is all ones
    else:
        base, rest = np.ones((1, 1)), n
    assert rest & (rest - 1) == 0, n
    h2 = np.ones((1, 1))
    while h2.shape[0] < rest:
        h2 = np.block([[h2, h2], [h2, -h2]])
    h = np.kron(base, h2)
    assert np.allclose(h @ h.T, n * np.eye(n)), n
    return h


def preprocess(images):
    """uint8 [N,28,28] → normalised [N,3,224,224] as ckpt does it: 8×8 pixel repeat, ImageNet mean/std."""
    x = np.repeat(np.repeat(images.astype(np.float64) / 255.0, 8, 1), 8, 2)[:, None].repeat(3, 1)
    mean, std = np.array([0.485, 0.456, 0.406])[None, :, None, None], np.array([0.229, 0.224, 0.225])[None, :, None, None]
    return (x - mean) / std


def random_signs(n, seed):
    return np.random.default_rng(seed).choice([-1.0, 1.0], n)


def fake(x, bits, lo, hi, log):
    if log:  # log√2 with Δ = hi
        r = x / hi
        qv = torch.round(-2 * torch.log2(r.clamp(min=1e-30)))
        dead = (qv >= 2 ** bits) | (x <= 0)
        qv = qv.clamp(0, 2 ** bits - 1)
        out = torch.pow(2.0, -torch.ceil(qv / 2)) * torch.where(qv % 2 == 1, 1 + (math.sqrt(2) - 1), 1.0) * hi
        return torch.where(dead, torch.zeros_like(out), out)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    s = (hi - lo).clamp(min=1e-12) / (2 ** bits - 1)
    zp = torch.round(-lo / s)
    return (torch.clamp(torch.round(x / s) + zp, 0, 2 ** bits - 1) - zp) * s


ALPHAS = torch.linspace(0.1, 1.0, 19, dtype=torch.float64)


def search(values, bits, per_channel, log, rule, weight=None):
    """(lo, hi) of a site: min–max, or the clipping factor α·[min, max] with the least squared error (per channel
    for per-channel sites; α·max for log√2); rule 'output' with the weight of the Linear the site feeds: the least
    squared error of that Linear's output, (x̂ − x)·Wᵀ (PTQ4ViT-style), over the sampled token rows."""
    lo = values.amin(0) if per_channel else values.min()
    hi = values.amax(0) if per_channel else values.max()
    if rule == "minmax":
        return lo, hi
    best, best_lo, best_hi = None, lo, hi
    for a in ALPHAS:
        l, h = (lo, hi * a) if log else (lo * a, hi * a)
        if rule == "output" and weight is not None and not per_channel:
            err = ((fake(values, bits, l, h, log) - values) @ weight.T).pow(2).sum()
        else:
            err = (fake(values, bits, l, h, log) - values).pow(2)
            err = err.sum(0) if per_channel else err.sum()
        if best is None:
            best, best_lo, best_hi = err, l.clone(), h.clone()
        else:
            better = err < best
            best = torch.where(better, err, best)
            best_lo, best_hi = torch.where(better, l, best_lo), torch.where(better, h, best_hi)
    return best_lo, best_hi


class Model:
    def __init__(self, w, depth, heads=6, eps=1e-6):
        self.w = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)).to(DTYPE) for k, v in w.items()}
        self.depth, self.heads, self.eps = depth, heads, eps
        self.online_fc2 = None  # [1536, 1536] rotation applied to fc2's input at run time
        self.sites, self.record, self.weight_bits = {}, None, None
        self.quantized_weights = {}
        self.range_rule = "mse"
        # Per-tensor sites that feed a Linear (the 'output' rule's weights).
        self.feeds = {f"b{i}.{s}": f"encoder.layer.{i}.{t}.weight" for i in range(depth) for s, t in (("proj", "attention.output.dense"), ("fc2", "mlp.fc2"))}
        self.feeds["head.input"] = "head.weight"

    def quantize_weights(self, bits):
        """Per-output-channel asymmetric min–max RTN of every Linear (the head too)."""
        self.quantized_weights = {}
        for k, v in self.w.items():
            if k.endswith(".weight") and v.ndim == 2 and ("encoder.layer" in k or k.startswith("head")):
                lo, hi = search(v.T, bits, True, False, self.range_rule)
                self.quantized_weights[k] = fake(v.T, bits, lo, hi, False).T

    def W(self, k):
        return self.quantized_weights.get(k, self.w[k])

    def q(self, name, x, per_channel=False, log=False):
        if self.record is not None:  # calibration: keep a sample (rows of tokens for per-channel sites)
            rows = per_channel or self.range_rule == "output" and name in self.feeds
            flat = x.reshape(-1, x.shape[-1]) if rows else x.reshape(-1)
            take = torch.randperm(flat.shape[0], generator=self.rng)[: (4096 if rows else 200_000)]
            self.record.setdefault(name, []).append((flat[take], per_channel, log))
            return x
        p = self.sites.get(name)
        if p is None:
            return x
        bits, lo, hi, log = p
        return fake(x, bits, lo, hi, log)

    def calibrate(self, pixels, bits):
        self.record, self.rng = {}, torch.Generator().manual_seed(0)
        for i in range(0, len(pixels), 8):
            self.logits(pixels[i:i + 8])
        self.sites = {}
        for k, parts in self.record.items():
            values, per_channel, log = torch.cat([p[0] for p in parts]), parts[0][1], parts[0][2]
            b = 8 if k == "patch.input" else bits
            weight = self.W(self.feeds[k]) if k in self.feeds else None
            self.sites[k] = (b, *search(values, b, per_channel, log, self.range_rule, weight), log)
        self.record = None

    def ln(self, x, p):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], self.w[p + ".weight"], self.w[p + ".bias"], self.eps)

    def lin(self, x, p):
        return x @ self.W(p + ".weight").T + self.w[p + ".bias"]

    @torch.no_grad()
    def logits(self, pixels):
        w = self.w
        x = self.q("patch.input", torch.from_numpy(preprocess(pixels)).to(DTYPE))
        conv = w["embeddings.patch_embeddings.projection.weight"]
        e = torch.nn.functional.conv2d(x, conv, w["embeddings.patch_embeddings.projection.bias"], stride=14).flatten(2).transpose(1, 2)
        n, d = e.shape[0], e.shape[-1]
        t = torch.cat([w["embeddings.cls_token"].reshape(1, 1, d).expand(n, 1, d), e], 1) + w["embeddings.position_embeddings"].reshape(1, -1, d)
        hd = d // self.heads
        split = lambda z: z.reshape(n, -1, self.heads, hd).transpose(1, 2)  # noqa: E731
        for i in range(self.depth):
            p, b = f"encoder.layer.{i}.", f"b{i}."
            h = self.q(b + "qkv", self.ln(t, p + "norm1"), per_channel=True)
            a = p + "attention.attention."
            qq, kk, vv = (self.q(b + s, self.lin(h, a + s)) for s in ("query", "key", "value"))
            probs = self.q(b + "probs", torch.softmax((split(qq) @ split(kk).transpose(-1, -2)) * hd ** -0.5, -1), log=True)
            o = (probs @ split(vv)).transpose(1, 2).reshape(n, -1, d)
            y = self.lin(self.q(b + "proj", o), p + "attention.output.dense")
            t = t + (w[p + "layer_scale1.lambda1"] * y if p + "layer_scale1.lambda1" in w else y)
            h2 = self.q(b + "fc1", self.ln(t, p + "norm2"), per_channel=True)
            g = torch.nn.functional.gelu(self.lin(h2, p + "mlp.fc1"))
            if self.online_fc2 is not None:
                g = g @ self.online_fc2
            y = self.lin(self.q(b + "fc2", g), p + "mlp.fc2")
            t = t + (w[p + "layer_scale2.lambda1"] * y if p + "layer_scale2.lambda1" in w else y)
        f = self.q("head.input", self.ln(t[:, 0], "layernorm"))
        return self.lin(f, "head")


def rotate_residual(m, seed):
    w, d = m.w, m.w["embeddings.cls_token"].shape[-1]
    h = torch.from_numpy(hadamard(d) / math.sqrt(d))
    sign = torch.from_numpy(random_signs(d, seed))
    sign[0] = 1.0
    Q = (h @ torch.diag(sign) @ h.T).to(DTYPE)
    assert torch.allclose(Q @ torch.ones(d, dtype=Q.dtype), torch.ones(d, dtype=Q.dtype))
    centre_rows = lambda W: W - W.mean(0, keepdim=True)  # noqa: E731  (W [out, …]: zero mean over the output features)
    # Writes into the stream: embeddings, proj and fc2 (LayerScale folded first), centred then rotated (out' = Qᵀ·out).
    conv = w["embeddings.patch_embeddings.projection.weight"]
    w["embeddings.patch_embeddings.projection.weight"] = (Q.T @ centre_rows(conv.reshape(d, -1))).reshape(conv.shape)
    w["embeddings.patch_embeddings.projection.bias"] = Q.T @ (w["embeddings.patch_embeddings.projection.bias"] - w["embeddings.patch_embeddings.projection.bias"].mean())
    for k in ("embeddings.cls_token", "embeddings.position_embeddings"):
        v = w[k]
        w[k] = (v - v.mean(-1, keepdim=True)) @ Q
    for i in range(m.depth):
        p = f"encoder.layer.{i}."
        for lin, ls in (("attention.output.dense", "layer_scale1.lambda1"), ("mlp.fc2", "layer_scale2.lambda1")):
            W, b = w[p + lin + ".weight"], w[p + lin + ".bias"]
            if p + ls in w:
                g = w.pop(p + ls)
                W, b = g[:, None] * W, g * b
            w[p + lin + ".weight"], w[p + lin + ".bias"] = Q.T @ centre_rows(W), Q.T @ (b - b.mean())
        # Reads: the LayerNorms' γ/β into the Linears they feed, then the input rotation (W ← W·diag(γ)·Q).
        for norm, targets in (("norm1", ["attention.attention.query", "attention.attention.key", "attention.attention.value"]), ("norm2", ["mlp.fc1"])):
            g, be = w[p + norm + ".weight"], w[p + norm + ".bias"]
            for tname in targets:
                W = w[p + tname + ".weight"]
                w[p + tname + ".bias"] = w[p + tname + ".bias"] + W @ be
                w[p + tname + ".weight"] = (W * g[None, :]) @ Q
            w[p + norm + ".weight"], w[p + norm + ".bias"] = torch.ones(d, dtype=g.dtype), torch.zeros(d, dtype=g.dtype)
    g, be = w["layernorm.weight"], w["layernorm.bias"]
    W = w["head.weight"]
    w["head.bias"] = w["head.bias"] + W @ be
    w["head.weight"] = (W * g[None, :]) @ Q
    w["layernorm.weight"], w["layernorm.bias"] = torch.ones(d, dtype=g.dtype), torch.zeros(d, dtype=g.dtype)


def rotate_values(m):
    """Per head: v' = H·v (rows of the value Linear), proj's input columns ← ·Hᵀ (blockwise): proj sees o·H."""
    d, hd = m.w["embeddings.cls_token"].shape[-1], m.w["embeddings.cls_token"].shape[-1] // m.heads
    h = torch.from_numpy(hadamard(hd) / math.sqrt(hd))
    big = torch.block_diag(*[h] * m.heads).to(DTYPE)
    for i in range(m.depth):
        p = f"encoder.layer.{i}."
        v = p + "attention.attention.value"
        m.w[v + ".weight"], m.w[v + ".bias"] = big.T @ m.w[v + ".weight"], big.T @ m.w[v + ".bias"]
        o = p + "attention.output.dense.weight"
        m.w[o] = m.w[o] @ big


def rotate_fc2(m, seed):
    n = m.w["encoder.layer.0.mlp.fc1.weight"].shape[0]
    h = (torch.from_numpy(hadamard(n) / math.sqrt(n)) * torch.from_numpy(random_signs(n, seed + 1))[:, None]).to(DTYPE)
    m.online_fc2 = h
    for i in range(m.depth):
        k = f"encoder.layer.{i}.mlp.fc2.weight"
        m.w[k] = m.w[k] @ h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="8:8,4:4")
    ap.add_argument("--transforms", default="none,residual,residual+value,residual+value+fc2,fc2")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--calibration", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--range", default="mse", choices=["mse", "minmax", "output"])
    ap.add_argument("--float32", action="store_true", help="run in float32 (faster; the float exactness check is then ~1e-5)")
    ap.add_argument("--families", help="comma list: quantize only these site families (patch,qkv,query,key,value,probs,proj,fc1,fc2,head) "
                    "and weights only if 'weights' is listed; one run per family")
    a = ap.parse_args()
    global DTYPE
    DTYPE = torch.float32 if a.float32 else torch.float64
    base = load_file(str(ROOT / ".cache/dinov2/dinov2-small-224/model.safetensors"))
    head = load_file(str(ROOT / "fixtures/eval/fmnist_head.safetensors"))
    w = dict(base, **{"head." + k: v for k, v in head.items()})
    depth = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("encoder.layer."))
    data = np.load(ROOT / "fixtures/eval/fmnist_eval.npz")
    images, labels = data["images"][: a.limit], data["labels"][: a.limit]
    calib = np.load(ROOT / "fixtures/eval/fmnist_calibration.npz")["images"][: a.calibration]
    f32 = Model(w, depth)
    ref = torch.cat([f32.logits(images[i:i + 16]) for i in range(0, len(images), 16)])
    print(f"F32 accuracy {(ref.argmax(1).numpy() == labels).mean():.4f} on {len(labels)} images", flush=True)
    for tr in a.transforms.split(","):
        m = Model(w, depth)
        m.range_rule = a.range
        if "residual" in tr:
            rotate_residual(m, a.seed)
        if "value" in tr:
            rotate_values(m)
        if "fc2" in tr:
            rotate_fc2(m, a.seed)
        out = torch.cat([m.logits(images[i:i + 16]) for i in range(0, len(images), 16)])
        print(f"{tr}: float logits max |Δ| {float((out - ref).abs().max()):.2e}", flush=True)
        for wb, ab in (tuple(map(int, x.split(":"))) for x in a.bits.split(",")):
            for family in (a.families.split(",") if a.families else [None]):
                if family in (None, "weights"):
                    m.quantize_weights(wb)
                m.calibrate(calib, ab)
                if family == "weights":
                    m.sites = {}
                elif family is not None:
                    m.sites = {k: v for k, v in m.sites.items() if k.split(".")[-1] == family or k == family + ".input"}
                out = torch.cat([m.logits(images[i:i + 16]) for i in range(0, len(images), 16)])
                lp, lq = torch.log_softmax(ref, 1), torch.log_softmax(out, 1)
                kl = float((lp.exp() * (lp - lq)).sum(1).mean())
                print(f"  W{wb}A{ab}{'' if family is None else ' only ' + family}: accuracy {(out.argmax(1).numpy() == labels).mean():.4f}, agreement "
                      f"{(out.argmax(1) == ref.argmax(1)).float().mean():.4f}, KL {kl:.4f}", flush=True)
                m.sites, m.quantized_weights = {}, {}


if __name__ == "__main__":
    main()
