"""A plain PyTorch forward of a DINOv2/ViT model folder written by `ckpt quantize --activation-bits`, applying every
activation quantizer of its side file (activation_quantization.json) from the stored parameters alone — the
independent reimplementation the interop tests compare `ckpt eval`/`ckpt run` against.

Model: Hugging Face transformers-v4 names (`embeddings.*`, `encoder.layer.N.*`, `layernorm.*`), pre-norm blocks with
LayerScale when present, exact-erf GELU, LayerNorm eps from config.json (default 1e-6). The position table must already
be at the input size (as in the folders the interop suite uses). Fake quantization, float32 like ckpt:
  uniform:  x̂ = (clamp(round(x/Δ) + zp, 0, 2^b − 1) − zp)·Δ        (torch.round: half to even)
  log√2:    q = clamp(round(−2·log2(x/Δ)), 0, 2^b − 1), x̂ = 2^(−⌈q/2⌉)·(1 + (q mod 2)(√2 − 1))·Δ, 0 where the
            unclamped q ≥ 2^b or x ≤ 0
Sites: patch_embed.input (the pixels), blocks.i.{qkv,proj,fc1,fc2}.input, blocks.i.attn.{q,k,v,probs} (q, k before the
1/√d scale), head.input (the final-norm CLS features).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file


def fake_uniform(x: torch.Tensor, p: dict) -> torch.Tensor:
    s = torch.tensor(p["scale"], dtype=x.dtype)
    zp = torch.tensor(p["zero_point"], dtype=x.dtype)
    q = torch.clamp(torch.round(x / s) + zp, 0, 2 ** p["bits"] - 1)
    return (q - zp) * s


def fake_log_sqrt2(x: torch.Tensor, p: dict) -> torch.Tensor:
    s = torch.tensor(p["scale"], dtype=x.dtype)
    r = x / s
    with torch.no_grad():
        q = torch.round(-2 * torch.log2(torch.clamp(r, min=torch.finfo(x.dtype).tiny)))
    dead = (q >= 2 ** p["bits"]) | (x <= 0)
    q = torch.clamp(q, 0, 2 ** p["bits"] - 1)
    odd = torch.remainder(q, 2) == 1
    f = torch.where(odd, torch.tensor(1 + (math.sqrt(2) - 1), dtype=x.dtype), torch.tensor(1.0, dtype=x.dtype))
    out = (torch.pow(torch.tensor(2.0, dtype=x.dtype), -torch.ceil(q / 2)) * f) * s
    return torch.where(dead, torch.zeros_like(out), out)


class QuantizedViT:
    def __init__(self, folder: Path, sites: dict | None = None):
        folder = Path(folder)
        self.w = {k: torch.from_numpy(v.astype(np.float32)) for k, v in load_file(str(folder / "model.safetensors")).items()}
        cfg = json.loads((folder / "config.json").read_text())
        self.heads = cfg.get("num_attention_heads", 6)
        self.eps = cfg.get("layer_norm_eps", 1e-6)
        side = json.loads((folder / "activation_quantization.json").read_text())
        self.sites = side["sites"] if sites is None else sites
        self.depth = 1 + max(int(k.split(".")[2]) for k in self.w if k.startswith("encoder.layer."))

    def q(self, name: str, x: torch.Tensor) -> torch.Tensor:
        p = self.sites.get(name)
        if p is None:
            return x
        return fake_log_sqrt2(x, p) if p["kind"] == "log_sqrt2" else fake_uniform(x, p)

    def ln(self, x, prefix):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], self.w[prefix + ".weight"], self.w[prefix + ".bias"], self.eps)

    def linear(self, x, prefix):
        return x @ self.w[prefix + ".weight"].T + self.w[prefix + ".bias"]

    @torch.no_grad()
    def features(self, pixels: np.ndarray) -> torch.Tensor:
        w = self.w
        x = self.q("patch_embed.input", torch.from_numpy(pixels.astype(np.float32)))
        conv = w["embeddings.patch_embeddings.projection.weight"]
        e = torch.nn.functional.conv2d(x, conv, w["embeddings.patch_embeddings.projection.bias"], stride=conv.shape[-1])
        e = e.flatten(2).transpose(1, 2)
        n, d = e.shape[0], e.shape[-1]
        t = torch.cat([w["embeddings.cls_token"].reshape(1, 1, d).expand(n, 1, d), e], 1)
        t = t + w["embeddings.position_embeddings"].reshape(1, -1, d)
        hd = d // self.heads
        for i in range(self.depth):
            p = f"encoder.layer.{i}."
            b = f"blocks.{i}."
            h = self.q(b + "qkv.input", self.ln(t, p + "norm1"))
            a = p + "attention.attention."
            split = lambda z: z.reshape(n, -1, self.heads, hd).transpose(1, 2)  # noqa: E731
            qq = self.q(b + "attn.q", self.linear(h, a + "query"))
            kk = self.q(b + "attn.k", self.linear(h, a + "key"))
            vv = self.q(b + "attn.v", self.linear(h, a + "value"))
            s = (split(qq) @ split(kk).transpose(-1, -2)) * hd ** -0.5
            probs = self.q(b + "attn.probs", torch.softmax(s, -1))
            o = (probs @ split(vv)).transpose(1, 2).reshape(n, -1, d)
            y = self.linear(self.q(b + "proj.input", o), p + "attention.output.dense")
            t = t + (w[p + "layer_scale1.lambda1"] * y if p + "layer_scale1.lambda1" in w else y)
            h2 = self.q(b + "fc1.input", self.ln(t, p + "norm2"))
            g = torch.nn.functional.gelu(self.linear(h2, p + "mlp.fc1"))
            y = self.linear(self.q(b + "fc2.input", g), p + "mlp.fc2")
            t = t + (w[p + "layer_scale2.lambda1"] * y if p + "layer_scale2.lambda1" in w else y)
        return self.q("head.input", self.ln(t[:, 0], "layernorm"))
