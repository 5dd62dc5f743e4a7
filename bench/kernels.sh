#!/usr/bin/env bash
# Element-wise kernel benchmark: the Swift SIMD8 kernels ckpt had before against the C kernels at every ISA level this
# CPU runs (DINOv2-S shapes, batch 8), medians of N runs (default 31). Built like the release binary (scripts/build.sh:
# host CPU's vector unit for the Swift code); the bench target exists only when CKPT_BENCH=1.
#   bench/kernels.sh [runs]
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT_BENCH=1 scripts/build.sh --product ckpt-kernel-bench >&2
exec .build/release/ckpt-kernel-bench "${1:-31}"
