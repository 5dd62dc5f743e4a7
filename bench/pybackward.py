#!/usr/bin/env python3
"""PyTorch peer for the backward benchmark (bench/backward.py runs it as a fresh process per round).

    python pybackward.py MODEL_FOLDER BATCH.npy TARGETS.npy HEAD.safetensors OUT_GRADIENT.npy

transformers.Dinov2Model.from_pretrained(MODEL_FOLDER).eval() (default attention implementation), parameters
frozen, torch.set_num_threads(2); the input requires grad. Loss: soft cross-entropy of the linear head's logits on
the CLS features against TARGETS, summed over the batch — what `ckpt gradient --targets` computes. One untimed
warm-up forward + backward, then one timed (time.perf_counter around forward, loss and backward). Writes the
input gradient as F32 .npy and prints one JSON line (seconds, threads, versions).
"""
import json
import sys
import time

THREADS = 2


def main(folder, batch, targets, head, out):
    import numpy as np
    import torch
    import transformers
    from safetensors.numpy import load_file

    torch.set_num_threads(THREADS)
    model = transformers.Dinov2Model.from_pretrained(folder).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    h = load_file(head)
    w, b = torch.from_numpy(h["weight"]), torch.from_numpy(h["bias"])
    x, t = torch.from_numpy(np.load(batch)), torch.from_numpy(np.load(targets))

    def step():
        xt = x.clone().requires_grad_(True)
        z = model(pixel_values=xt).last_hidden_state[:, 0] @ w.T + b
        (-(t * torch.log_softmax(z, dim=1)).sum()).backward()
        return xt.grad

    step()
    c0, t0 = time.process_time(), time.perf_counter()
    g = step()
    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    np.save(out, g.numpy().astype(np.float32))
    print(json.dumps({"peer": "torch", "n": x.shape[0], "seconds": sec, "cpu_seconds": cpu,
                      "info": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "threads": torch.get_num_threads(),
                               "attn_implementation": model.config._attn_implementation}}))


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    main(*sys.argv[1:])
