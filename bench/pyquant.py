#!/usr/bin/env python3
"""Python peers for the quantization benchmark (bench/quantize.py runs each as a fresh process per run).

    python pyquant.py gguf IN.safetensors OUT.gguf Q8_0|Q4_0
    python pyquant.py mlx  IN.safetensors OUT_DIR BITS GROUP_SIZE

gguf: what a user writes with gguf-py (the library llama.cpp's converters use): `safetensors.numpy.load_file`,
`gguf.quants.quantize(w, GGMLQuantizationType.Q8_0)` for every Linear weight, `GGUFWriter` (architecture "vit",
general.file_type, general.quantization_version), every other tensor added as it is (F32).

mlx: `mx.load` the safetensors (evaluated, so the read is done before quantizing), `mx.quantize(w, group_size,
bits)` (affine, RTN) for every Linear weight, one `mx.eval` of all results, `mx.save_safetensors(OUT_DIR/
model.safetensors)` with mlx-lm's names (`m.weight` uint32, `m.scales`, `m.biases`) and metadata format=mlx, plus a
config.json with mlx-lm's quantization block. mlx runs on the CPU (the only device of the project's mlx build).

The tensors quantized are the ones `ckpt quantize` picks (Sources/CkptQuant/TensorSelection.swift and
QuantizationPlan.swift): 2-D, name ends in ".weight", name (lower-cased) contains none of embed/token/position,
floating dtype, input size (last dim) a multiple of the block (32 for ggml, the group size for mlx). Everything
else is kept as it is. The bench checks the set against ckpt's --json report.

Prints one JSON line to stdout: phases (seconds since interpreter start, cumulative), the seconds spent inside the
quantize calls alone (`quantize_s`; mlx: from the first mx.quantize to the end of the mx.eval), and the names of
the quantized tensors.
"""
import time

T0 = time.perf_counter()
marks = {}


def mark(name):
    marks[name] = time.perf_counter() - T0


import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402


def selected(name, shape, dtype_is_float, block):
    lower = name.lower()
    return (dtype_is_float and len(shape) == 2 and name.endswith(".weight")
            and not any(s in lower for s in ("embed", "token", "position"))
            and shape[0] > 0 and shape[1] > 0 and shape[1] % block == 0)


def run_gguf(src, out, type_name):
    import numpy as np
    import gguf
    from gguf import quants
    from safetensors.numpy import load_file
    mark("import")

    qtype = gguf.GGMLQuantizationType[type_name]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    sd = load_file(src)
    mark("load")

    writer = gguf.GGUFWriter(out, "vit")
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{type_name}"].value)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    quantized, q_s = [], 0.0
    for name, w in sd.items():
        if selected(name, w.shape, w.dtype.kind == "f", block):
            t = time.perf_counter()
            q = quants.quantize(w.astype(np.float32, copy=False), qtype)
            q_s += time.perf_counter() - t
            writer.add_tensor(name, q, raw_dtype=qtype)
            quantized.append(name)
        else:
            writer.add_tensor(name, w)
    mark("quantize")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    mark("write")
    return quantized, q_s


def run_mlx(src, out_dir, bits, group_size):
    import mlx.core as mx
    mark("import")

    weights = mx.load(src)
    mx.eval(list(weights.values()))
    mark("load")

    t = time.perf_counter()
    out, quantized = {}, []
    for name, w in weights.items():
        if selected(name, w.shape, mx.issubdtype(w.dtype, mx.floating), group_size):
            wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
            module = name[: -len(".weight")]
            out[name], out[module + ".scales"], out[module + ".biases"] = wq, scales, biases
            quantized.append(name)
        else:
            out[name] = w
    mx.eval(list(out.values()))
    q_s = time.perf_counter() - t
    mark("quantize")

    os.makedirs(out_dir, exist_ok=True)
    mx.save_safetensors(os.path.join(out_dir, "model.safetensors"), out, metadata={"format": "mlx"})
    q = {"bits": bits, "group_size": group_size, "mode": "affine"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({"quantization": q, "quantization_config": q}, f, indent=2)
    mark("write")
    return quantized, q_s


def main(argv):
    if len(argv) >= 4 and argv[0] == "gguf":
        quantized, q_s = run_gguf(argv[1], argv[2], argv[3])
    elif len(argv) >= 5 and argv[0] == "mlx":
        quantized, q_s = run_mlx(argv[1], argv[2], int(argv[3]), int(argv[4]))
    else:
        sys.exit(__doc__)
    print(json.dumps({"phases_s": marks, "quantize_s": q_s, "quantized": quantized}))


if __name__ == "__main__":
    main(sys.argv[1:])
