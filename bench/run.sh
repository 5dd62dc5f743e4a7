#!/usr/bin/env bash
# ckpt vs Python benchmark. Usage: bench/run.sh [--quick] [bench.py options]
#                                  bench/run.sh merge [merge.py options]
#                                  bench/run.sh infer [infer.py options, e.g. --repeats 5]
#                                  bench/run.sh quantize [quantize.py options, e.g. --quick --rounds 2]
#   --quick   ~100 MB checkpoint (default: ~1.2 GB ViT-L/16, ~6-8 min on 2 cores)
#   merge     ckpt merge vs PEFT merge_and_unload: LoRA r=16 on a ViT-B/16 (~2 min; needs torch + peft)
#   infer     ckpt run vs onnxruntime vs PyTorch CPU: DINOv2-S/14, 224 px, batch 32 (~3 min; needs
#             onnx, onnxruntime, torch, transformers)
#   backward  ckpt gradient vs PyTorch CPU autograd: forward + backward to the input, DINOv2-S/14, 224 px,
#             batch 32 (~3 min; needs torch, transformers)
#   quantize  ckpt quantize vs gguf-py (GGUF Q8_0/Q4_0) and mlx (4-bit g64), plus hqq/mse vs rtn, on the
#             ViT-L/16 checkpoint (needs gguf, mlx)
# Inputs are cached in bench/work/; results go to bench/work/results-latest-*.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then py="$repo/.venv/bin/python"; else py="python3"; fi
fi
script="$here/bench.py"
mods="numpy, safetensors, ml_dtypes"
if [[ "${1:-}" == "merge" ]]; then
  shift
  script="$here/merge.py"
  mods="numpy, safetensors, torch, peft"
elif [[ "${1:-}" == "infer" ]]; then
  shift
  script="$here/infer.py"
  mods="numpy, safetensors, onnx, onnxruntime, torch, transformers"
elif [[ "${1:-}" == "backward" ]]; then
  shift
  script="$here/backward.py"
  mods="numpy, safetensors, onnx, torch, transformers"
elif [[ "${1:-}" == "quantize" ]]; then
  shift
  script="$here/quantize.py"
  mods="numpy, safetensors, gguf, mlx"
fi
if ! "$py" -c "import $mods" 2>/dev/null; then
  echo "error: $py lacks one of: $mods (pip install ${mods//,/})" >&2
  exit 2
fi

ckpt="${CKPT:-$repo/.build/release/ckpt}"
if [[ ! -x "$ckpt" ]]; then
  echo "error: $ckpt not found; build it first: scripts/build.sh" >&2
  exit 2
fi

exec "$py" "$script" --ckpt "$ckpt" --python "$py" "$@"
