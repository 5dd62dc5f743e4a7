#!/usr/bin/env bash
# Release build of the ckpt binary, with the Swift runtime linked statically: it starts in ~2 ms instead of ~5
# (that is what keeps `ckpt inspect` on a 1 GB file under 10 ms). The binary lands in .build/release/ckpt.
#
# Code is generated for the host CPU's vector unit, as llama.cpp's default build does: on an x86-64 CPU with
# AVX2, FMA, F16C, BMI2, MOVBE and LZCNT (x86-64-v3; LLVM's `haswell`) the eight-lane kernels become 256-bit
# instructions instead of pairs of SSE2 ones (1.2 GB bench, medians of 7 interleaved runs: MLX 4-bit RTN 0.88 ->
# 0.72 s, HQQ 2.46 -> 2.14 s; GGUF, already I/O-bound, within 2 %). The files written are byte-identical either
# way: the kernels use IEEE operations only, and Swift never fuses a*b+c on its own.
# CKPT_TARGET_CPU overrides the choice: `x86-64` for a binary that runs on any x86-64 machine, or an LLVM CPU name.
set -euo pipefail
cd "$(dirname "$0")/.."

target_cpu="${CKPT_TARGET_CPU:-}"
if [[ -z $target_cpu && $(uname -m) == x86_64 && -r /proc/cpuinfo ]]; then
    host_flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    target_cpu=haswell
    for flag in avx2 fma f16c bmi1 bmi2 movbe abm; do
        [[ $host_flags == *" $flag "* ]] || { target_cpu=""; break; }
    done
fi

cpu_flags=()
[[ -n $target_cpu ]] && cpu_flags=(-Xswiftc -target-cpu -Xswiftc "$target_cpu")
echo "scripts/build.sh: target CPU ${target_cpu:-baseline}" >&2
swift build -c release --static-swift-stdlib "${cpu_flags[@]}" "$@"
