#!/usr/bin/env python3
"""Writes the seed inputs of the png, config and merge fuzz targets (Python standard library only).

    python3 fuzz/make_seeds.py          # from the repository root; rewrites fuzz/seeds/{png,config,merge}/

png:    small images of every colour type / bit depth, some Adam7, some split over several IDAT chunks, with
        stored (level 0) deflate blocks so that the CRC + Adler-32 fixing mutator (PNGFixup.swift) can change
        pixel and filter bytes without breaking the stream. (fixtures/png/*.png are added by run.sh itself.)
config: one kind byte (FuzzConfig.swift: 0 quant, 1 index, 2 peft, 3 vit, 4 preprocessor), then the file:
        every adapter_config.json under fixtures/adapters/peft, fixtures/sharded/model.safetensors.index.json,
        and hand-written MLX / compressed-tensors / ViT configs matching the companion files the target builds.
merge:  a 4-byte little-endian prefix (config length | base << 24; base 0 ViT, 1 GPT-2, 2 BERT), the adapter's
        adapter_config.json, then its adapter_model.safetensors, for every PEFT fixture folder.
The known merge crasher (a lora_B of shape [0, 2^40, 2^40]) goes to fuzz/regressions/merge/ (see fuzz/README.md).
"""
import glob
import json
import os
import struct
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def out_dir(*parts):
    path = os.path.join(ROOT, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------------------- png

def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width, height, depth, colour, rows, interlace=0, level=0, split=1, extra=b"", palette=None):
    """rows: the filtered scanline bytes (filter byte + samples per row, per Adam7 pass when interlaced)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    data = zlib.compress(rows, level)
    parts = [data[i * len(data) // split:(i + 1) * len(data) // split] for i in range(split)]
    body = chunk(b"IHDR", ihdr) + extra
    if palette is not None:
        body += chunk(b"PLTE", palette)
    for part in parts:
        body += chunk(b"IDAT", part)
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")


def scanlines(width, height, bits_per_pixel, filters=(0, 1, 2, 3, 4)):
    row_bytes = (width * bits_per_pixel + 7) // 8
    out = b""
    for y in range(height):
        out += bytes([filters[y % len(filters)]]) + bytes((x * 37 + y * 11) & 0xFF for x in range(row_bytes))
    return out


def adam7(width, height, bits_per_pixel):
    out = b""
    for x0, y0, dx, dy in [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]:
        w = (width - x0 + dx - 1) // dx if width > x0 else 0
        h = (height - y0 + dy - 1) // dy if height > y0 else 0
        if w and h:
            out += scanlines(w, h, bits_per_pixel)
    return out


def png_seeds():
    d = out_dir("fuzz", "seeds", "png")
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
    seeds = {}
    for colour, depths in [(0, [1, 2, 4, 8, 16]), (2, [8, 16]), (3, [1, 2, 4, 8]), (4, [8, 16]), (6, [8, 16])]:
        for depth in depths:
            bpp = samples[colour] * depth
            pal = bytes(range(48)) if colour == 3 else None  # 16 entries: higher indices are out of range
            name = f"stored-c{colour}-d{depth}"
            seeds[name + ".png"] = png(5, 4, depth, colour, scanlines(5, 4, bpp), palette=pal)
            seeds[name + "-adam7.png"] = png(9, 9, depth, colour, adam7(9, 9, bpp), interlace=1, palette=pal, split=3)
    trns = chunk(b"tRNS", b"\x00\x10") + chunk(b"gAMA", struct.pack(">I", 45455)) + chunk(b"tEXt", b"k\x00v")
    seeds["stored-c0-d8-ancillary.png"] = png(3, 3, 8, 0, scanlines(3, 3, 8), extra=trns)
    seeds["deflated-c2-d8-split.png"] = png(7, 5, 8, 2, scanlines(7, 5, 24), level=9, split=4)
    for name, data in seeds.items():
        write(os.path.join(d, name), data)
    return len(seeds)


# ------------------------------------------------------------------------------------------------------- config

QUANT_CONFIGS = {
    "mlx": {"model_type": "vit", "quantization": {"bits": 4, "group_size": 32, "mode": "affine"},
            "quantization_config": {"bits": 4, "group_size": 32, "mode": "affine"}},
    "mlx-per-module": {"quantization": {"bits": 2, "group_size": 64, "mlx": {"bits": 4, "group_size": 32, "mode": "affine"}}},
    "compressed-tensors": {
        "quantization": {"bits": 4, "group_size": 32},
        "quantization_config": {
            "config_groups": {
                "group_0": {"targets": ["ct"], "weights": {"actorder": None, "group_size": None, "num_bits": 4,
                                                          "strategy": "channel", "symmetric": True, "type": "int"}},
                "group_1": {"targets": ["re:ctz"], "weights": {"actorder": None, "group_size": 16, "num_bits": 4,
                                                              "strategy": "group", "symmetric": False, "type": "int"}},
                "group_2": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int"}},
            },
            "format": "pack-quantized", "ignore": ["plain"], "quant_method": "compressed-tensors",
            "quantization_status": "compressed", "version": "0.20.0"}},
    "compressed-tensors-legacy": {"quantization": {"bits": 4, "group_size": 32},
                                  "quantization_config": {"format": "mixed-precision", "quant_method": "compressed-tensors",
                                                          "version": "0.16.1"}},
    "empty": {},
}

VIT_CONFIGS = {
    "dinov2": {"architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 24, "num_hidden_layers": 2,
               "num_attention_heads": 2, "intermediate_size": 48, "mlp_ratio": 2, "patch_size": 4, "num_channels": 3,
               "image_size": 16, "layer_norm_eps": 1e-06, "hidden_act": "gelu", "use_swiglu_ffn": False,
               "layerscale_value": 1.0, "qkv_bias": True},
    "vit-resize": {"model_type": "vit", "hidden_size": 24, "num_attention_heads": 3, "image_size": 32, "layer_norm_eps": 1e-12},
}

PREPROCESSOR_CONFIGS = {
    "imagenet": {"do_normalize": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
                 "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": {"shortest_edge": 16}},
    "half": {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
}


def dumps(value):
    return json.dumps(value, indent=2).encode()


def config_seeds():
    d = out_dir("fuzz", "seeds", "config")
    seeds = {}
    for name, value in QUANT_CONFIGS.items():
        seeds[f"0-quant-{name}.json"] = b"\x00" + dumps(value)
    seeds["1-index-fixtures-sharded.json"] = b"\x01" + open(os.path.join(ROOT, "fixtures/sharded/model.safetensors.index.json"), "rb").read()
    for path in sorted(glob.glob(os.path.join(ROOT, "fixtures/adapters/peft/**/adapter_config.json"), recursive=True)):
        case = os.path.relpath(os.path.dirname(path), os.path.join(ROOT, "fixtures/adapters/peft")).replace("/", "-")
        seeds[f"2-peft-{case}.json"] = b"\x02" + open(path, "rb").read()
    # The companion adapter's own modules in the patterns, in each PEFT version's key style.
    seeds["2-peft-patterns-companion.json"] = b"\x02" + dumps(
        {"peft_type": "LORA", "peft_version": "0.14.0", "r": 4, "lora_alpha": 16, "use_rslora": True, "bias": "lora_only",
         "rank_pattern": {"blocks.1.mlp.fc2": 2, "fc1": 4}, "alpha_pattern": {"qkv": 8.5, "blocks\\.1\\..*": 3},
         "modules_to_save": ["head"], "fan_in_fan_out": True, "lora_bias": True})
    for name, value in VIT_CONFIGS.items():
        seeds[f"3-vit-{name}.json"] = b"\x03" + dumps(value)
    for name, value in PREPROCESSOR_CONFIGS.items():
        seeds[f"4-preprocessor-{name}.json"] = b"\x04" + dumps(value)
    for name, data in seeds.items():
        write(os.path.join(d, name), data)
    return len(seeds)


# -------------------------------------------------------------------------------------------------------- merge

def pack_merge(config, weights, base):
    return struct.pack("<I", len(config) | base << 24) + config + weights


def safetensors_replace(data, name, shape, payload):
    """Rewrites a safetensors file with `name` given `shape` and `payload` (offsets recomputed, order kept)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out_header, out_body = {}, b""
    for key, value in header.items():
        if key == "__metadata__":
            out_header[key] = value
            continue
        start, end = value["data_offsets"]
        chunk_bytes = payload if key == name else body[start:end]
        entry = dict(value)
        if key == name:
            entry["shape"] = shape
        entry["data_offsets"] = [len(out_body), len(out_body) + len(chunk_bytes)]
        out_header[key] = entry
        out_body += chunk_bytes
    text = json.dumps(out_header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + out_body


def merge_seeds():
    d = out_dir("fuzz", "seeds", "merge")
    tiny = os.path.join(ROOT, "fixtures/adapters/peft/tiny")
    seeds = {}
    for config_path in sorted(glob.glob(os.path.join(tiny, "**/adapter_config.json"), recursive=True)):
        folder = os.path.dirname(config_path)
        case = os.path.relpath(folder, tiny).replace("/", "-")
        weights_path = os.path.join(folder, "adapter_model.safetensors")
        weights = open(weights_path, "rb").read() if os.path.exists(weights_path) else b""
        base = 1 if "gpt2" in case else 2 if "bert" in case else 0
        seeds[f"{case}.bin"] = pack_merge(open(config_path, "rb").read(), weights, base)
    for name, data in seeds.items():
        write(os.path.join(d, name), data)

    # Known crasher: lora_B with zero rows and huge trailing dims (0 elements, no data bytes).
    folder = os.path.join(tiny, "lora_basic")
    weights = safetensors_replace(open(os.path.join(folder, "adapter_model.safetensors"), "rb").read(),
                                  "base_model.model.blocks.0.attn.proj.lora_B.weight", [0, 1 << 40, 1 << 40], b"")
    crasher = pack_merge(open(os.path.join(folder, "adapter_config.json"), "rb").read(), weights, 0)
    write(os.path.join(out_dir("fuzz", "regressions", "merge"), "lora-b-zero-rows-huge-dims.bin"), crasher)
    return len(seeds)


if __name__ == "__main__":
    print(f"png: {png_seeds()} seeds, config: {config_seeds()} seeds, merge: {merge_seeds()} seeds (+1 regression)")
