#!/usr/bin/env bash
# Two ckpt binaries on the same quantize jobs, interleaved run by run so that the VM's drift cancels out; prints
# each job's median wall time per binary and the change. For comparing builds (flags, a kernel change), not
# against the Python peers (bench/run.sh quantize does that).
#
# Usage: bench/ab.sh BINARY_A BINARY_B [RUNS]     (RUNS default 7; the input is bench/run.sh's cached checkpoint)
# Example: CKPT_TARGET_CPU=x86-64 scripts/build.sh --scratch-path /tmp/base && \
#          bench/ab.sh /tmp/base/release/ckpt .build/release/ckpt
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 2 ]] || { sed -n 2,8p "$0" >&2; exit 2; }
a=$1 b=$2 runs=${3:-7}
input=bench/work/vit_l16_24blk_f32.safetensors
[[ -f $input ]] || { echo "error: $input missing; run bench/run.sh quantize once first" >&2; exit 1; }
for bin in "$a" "$b"; do [[ -x $bin ]] || { echo "error: $bin is not an executable" >&2; exit 1; }; done
out=$(mktemp -d bench/work/ab.XXXXXX)
trap 'rm -rf "$out"' EXIT

jobs=(q8_0 q4_0 mlx-rtn mlx-hqq)
arguments() {
    case $1 in
        q8_0) echo "$out/x.gguf --format gguf --gguf-type Q8_0" ;;
        q4_0) echo "$out/x.gguf --format gguf --gguf-type Q4_0" ;;
        mlx-rtn) echo "$out/x.mlx --format mlx --bits 4 --group-size 64 --method rtn" ;;
        mlx-hqq) echo "$out/x.mlx --format mlx --bits 4 --group-size 64 --method hqq" ;;
    esac
}
declare -A times
for ((round = 1; round <= runs; round++)); do
    for side in A B; do
        bin=$a; [[ $side == B ]] && bin=$b
        for job in "${jobs[@]}"; do
            rm -rf "$out/x.gguf" "$out/x.mlx"
            sync
            start=$(date +%s.%N)
            # shellcheck disable=SC2046  # the job's arguments are space-separated on purpose
            "$bin" quantize "$input" $(arguments "$job") >/dev/null
            end=$(date +%s.%N)
            times[$side-$job]+="$(python3 -c "print(f'{$end - $start:.3f}')") "
        done
    done
    echo "round $round/$runs done" >&2
done

median() { python3 -c "import statistics, sys; print(f'{statistics.median(map(float, sys.argv[1:])):.3f}')" $1; }
echo "A = $a"
echo "B = $b"
echo "| job | A median s | B median s | B vs A |"
echo "|---|---:|---:|---:|"
for job in "${jobs[@]}"; do
    ma=$(median "${times[A-$job]}") mb=$(median "${times[B-$job]}")
    echo "| $job | $ma | $mb | $(python3 -c "print(f'{100 * ($mb / $ma - 1):+.0f} %')") |"
done
