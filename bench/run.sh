#!/usr/bin/env bash
# ckpt vs Python benchmark. Usage: bench/run.sh [--quick] [bench.py options]
#   --quick   ~100 MB checkpoint (default: ~1.2 GB ViT-L/16, ~6-8 min on 2 cores)
# Inputs are cached in bench/work/; results go to bench/work/results-latest-*.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then py="$repo/.venv/bin/python"; else py="python3"; fi
fi
if ! "$py" -c 'import numpy, safetensors, ml_dtypes' 2>/dev/null; then
  echo "error: $py lacks numpy/safetensors/ml_dtypes (pip install numpy safetensors ml_dtypes)" >&2
  exit 2
fi

ckpt="${CKPT:-$repo/.build/release/ckpt}"
if [[ ! -x "$ckpt" ]]; then
  echo "error: $ckpt not found; build it first: swift build -c release" >&2
  exit 2
fi

exec "$py" "$here/bench.py" --ckpt "$ckpt" --python "$py" "$@"
