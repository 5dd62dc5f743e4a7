#!/usr/bin/env python3
"""Python reference implementations timed by bench.py.

Each operation is what a user would plausibly write with numpy + safetensors
(+ ml_dtypes for bfloat16). bench.py runs this file as a fresh subprocess per
measurement, so interpreter start-up and imports are part of the timing, just
as process start-up is part of the ckpt timing.

    python pyref.py inspect  IN  [OUT.json]
    python pyref.py f16      IN  OUT.safetensors
    python pyref.py bf16     IN  OUT.safetensors
    python pyref.py npz      IN  OUT.npz          (np.savez, stored)
    python pyref.py npz-z    IN  OUT.npz          (np.savez_compressed)
    python pyref.py from-npz IN.npz OUT.safetensors
"""
import json
import sys


def op_inspect(src, out=None):
    # Header only: safe_open parses the JSON header; get_slice gives
    # shape/dtype without reading tensor data.
    from safetensors import safe_open

    tensors = []
    with safe_open(src, framework="np") as f:
        meta = f.metadata() or {}
        for name in f.keys():
            sl = f.get_slice(name)
            tensors.append({"name": name, "dtype": sl.get_dtype(),
                            "shape": list(sl.get_shape())})
    doc = {"format": "safetensors", "metadata": meta, "tensors": tensors}
    text = json.dumps(doc)
    if out:
        with open(out, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)


def op_f16(src, out):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    sd = load_file(src)
    sd = {k: (v.astype(np.float16) if v.dtype.kind == "f" else v)
          for k, v in sd.items()}
    save_file(sd, out)


def op_bf16(src, out):
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    sd = load_file(src)
    sd = {k: (v.astype(ml_dtypes.bfloat16) if v.dtype.kind == "f" else v)
          for k, v in sd.items()}
    save_file(sd, out)


def op_npz(src, out):
    import numpy as np
    from safetensors.numpy import load_file

    np.savez(out, **load_file(src))


def op_npz_z(src, out):
    import numpy as np
    from safetensors.numpy import load_file

    np.savez_compressed(out, **load_file(src))


def op_from_npz(src, out):
    import numpy as np
    from safetensors.numpy import save_file

    with np.load(src) as z:
        sd = {k: z[k] for k in z.files}
    save_file(sd, out)


OPS = {
    "inspect": op_inspect,
    "f16": op_f16,
    "bf16": op_bf16,
    "npz": op_npz,
    "npz-z": op_npz_z,
    "from-npz": op_from_npz,
}

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in OPS:
        sys.exit(__doc__)
    OPS[sys.argv[1]](*sys.argv[2:])
