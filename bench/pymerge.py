#!/usr/bin/env python3
"""PEFT reference for the merge benchmark (bench/merge.py runs it as a fresh process per run).

    python pymerge.py BASE.safetensors ADAPTER_DIR OUT.safetensors [F32|F16]

What a user writes to bake a PEFT LoRA into a timm ViT and save a plain checkpoint: build the model,
load the base weights from safetensors, PeftModel.from_pretrained, merge_and_unload, save_file. The
model is fixtures/adapters/vit_timm.py's VisionTransformer at ViT-B/16 size (timm's own keys; timm
itself does not import with the project's CPU torch build). torch keeps its default thread count.

Prints one JSON line with the wall time of each phase (seconds since interpreter start) to stdout.
"""
import time

T0 = time.perf_counter()
marks = {}


def mark(name):
    marks[name] = time.perf_counter() - T0


import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "fixtures", "adapters"))

VIT_B16 = dict(dim=768, depth=12, heads=12, patch=16, grid=14, layer_scale=False, num_classes=1000)


def main(base, adapter, out, dtype="F32"):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from vit_timm import VisionTransformer
    mark("import")

    model = VisionTransformer(**VIT_B16)
    mark("build")
    model.load_state_dict(load_file(base))
    mark("load_base")
    model = PeftModel.from_pretrained(model, adapter)
    mark("load_adapter")
    model = model.merge_and_unload()
    mark("merge")
    if dtype == "F16":
        model = model.half()
    elif dtype != "F32":
        raise SystemExit(f"unsupported dtype {dtype}")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, out, metadata={"format": "pt"})
    mark("save")
    print(json.dumps({"threads": torch.get_num_threads(), "phases_s": marks}))


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    main(*sys.argv[1:])
