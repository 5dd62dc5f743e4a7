#!/usr/bin/env bash
# Builds the libFuzzer targets (the safetensors, .npy, .npz, GGUF and PNG parsers, the JSON configs read next to
# weights, and whole-command `merge` of a PEFT adapter folder) and runs them.
#
#   fuzz/run.sh [TARGET|all] [SECONDS]
#
# TARGET: safetensors | numpy | npz | gguf | png | config | merge | all (default all). SECONDS per target (default 60); 0 only replays the
# seed corpus and regressions once (a quick check that nothing known crashes).
# Environment: FUZZ_ARGS (extra libFuzzer flags, e.g. "-jobs=4 -workers=4" or "-seed=1"), SWIFTC (compiler),
# FUZZ_SKIP_REGRESSIONS=1 (do not seed with fuzz/regressions/<target>/, e.g. while a saved crash is unfixed).
# Outputs live under .build-fuzz/ (gitignored): build products, corpus-<target>/ working corpora seeded from
# fixtures/ (which is never written), artifacts/ (crash-*, oom-*, timeout-*, leak-*), logs/<target>.log.
# Exit status: 0 when no target found a problem, 1 when one did, 2 on a usage or build error.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$ROOT/.build-fuzz"
SWIFTC="${SWIFTC:-swiftc}"
TARGET="${1:-all}"
SECONDS_PER_TARGET="${2:-60}"
MAX_LEN=65536

case "$TARGET" in
    all) TARGETS=(safetensors numpy npz gguf png config merge) ;;
    safetensors|numpy|npz|gguf|png|config|merge) TARGETS=("$TARGET") ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: fuzz/run.sh [safetensors|numpy|npz|gguf|png|config|merge|all] [SECONDS]" >&2; exit 2 ;;
esac
[[ "$SECONDS_PER_TARGET" =~ ^[0-9]+$ ]] || { echo "SECONDS must be a whole number" >&2; exit 2; }

# The Swift runtime's crash backtracer fights ASan (its memory server trips ASan and can hang the process):
# leave crash reports to libFuzzer/ASan. Deterministic hashing keeps Set/Dictionary order, and so coverage,
# stable from run to run.
export SWIFT_BACKTRACE=enable=no
export SWIFT_DETERMINISTIC_HASHING=1
# The merge kernels and the ViT engine call OpenBLAS: one thread (the fuzzer is single-threaded per job).
export OPENBLAS_NUM_THREADS=1

mkdir -p "$OUT/mods" "$OUT/obj" "$OUT/artifacts" "$OUT/logs"

# Common flags: Swift 6 mode like the package, optimised with debug info, ASan + libFuzzer coverage. lld avoids
# gold's flood of "Cannot export local symbol __asan_*" warnings.
FLAGS=(-swift-version 6 -parse-as-library -O -g -sanitize=fuzzer,address -use-ld=lld)

# Rebuilds $1 when any of the remaining paths is newer than it (or it does not exist).
stale() {
    local product="$1"; shift
    [[ -e "$product" ]] || return 0
    [[ -n "$(find "$@" -newer "$product" -print -quit 2>/dev/null)" ]]
}

# module NAME DEPENDENCIES...: compiles Sources/NAME into $OUT/obj/NAME.o (and its .swiftmodule) when stale.
module() {
    local name="$1" object="$OUT/obj/$1.o"; shift
    if stale "$object" "Sources/$name" "$@"; then
        echo "== building $name (ASan + fuzzer coverage)"
        "$SWIFTC" -c -wmo "${FLAGS[@]}" -module-name "$name" -I "$OUT/mods" -I Sources/CCkptZlib -I Sources/CCkptOpenBLAS \
            -emit-module -emit-module-path "$OUT/mods/$name.swiftmodule" \
            "Sources/$name"/*.swift -o "$object"
        touch "$object"
    fi
}

build() {
    local core_o="$OUT/obj/CkptCore.o" formats_o="$OUT/obj/CkptFormats.o"
    # One build at a time (two run.sh started together would otherwise write the same objects).
    exec 9>"$OUT/build.lock"
    flock 9
    # Rebuild everything when the compiler or the flags change.
    local stamp="$OUT/obj/flags.stamp"
    local flags_now="$("$SWIFTC" --version 2>&1 | head -1) ${FLAGS[*]}"
    [[ -f "$stamp" && "$(cat "$stamp")" == "$flags_now" ]] || { rm -f "$OUT"/obj/*.o; echo "$flags_now" >"$stamp"; }
    module CkptCore
    module CkptFormats Sources/CCkptZlib "$core_o"
    # CkptMerge and CkptInference (OpenBLAS) only for the targets that call them (config, merge).
    local merge_o="$OUT/obj/CkptMerge.o" inference_o="$OUT/obj/CkptInference.o" needs_merge=0 needs_inference=0 t
    for t in "${TARGETS[@]}"; do
        case "$t" in
            config) needs_merge=1; needs_inference=1 ;;
            merge) needs_merge=1 ;;
        esac
    done
    [[ $needs_merge == 1 ]] && module CkptMerge Sources/CCkptOpenBLAS "$formats_o"
    [[ $needs_inference == 1 ]] && module CkptInference Sources/CCkptOpenBLAS "$merge_o"
    local src exe objs libs
    for t in "${TARGETS[@]}"; do
        read -r -a src <<<"$(source_for "$t")"
        exe="$OUT/fuzz-$t"
        objs=("$core_o" "$formats_o")
        libs=(-lz)
        case "$t" in
            config) objs+=("$merge_o" "$inference_o"); libs+=(-lopenblas) ;;
            merge) objs+=("$merge_o"); libs+=(-lopenblas) ;;
        esac
        if stale "$exe" "${src[@]}" fuzz/Support fuzz/CFuzzerHooks "${objs[@]}"; then
            echo "== linking fuzz-$t"
            "$SWIFTC" "${FLAGS[@]}" -module-name "CkptFuzz_$t" -I "$OUT/mods" -I Sources/CCkptZlib -I Sources/CCkptOpenBLAS \
                -I fuzz/CFuzzerHooks fuzz/Support/*.swift "${src[@]}" "${objs[@]}" "${libs[@]}" -o "$exe"
        fi
    done
    flock -u 9
}

source_for() {
    case "$1" in
        safetensors) echo fuzz/FuzzSafeTensors.swift ;;
        numpy) echo fuzz/FuzzNumPy.swift ;;
        npz) echo fuzz/FuzzNPZ.swift fuzz/ZipFixup.swift ;;
        gguf) echo fuzz/FuzzGGUF.swift ;;
        png) echo fuzz/FuzzPNG.swift fuzz/PNGFixup.swift ;;
        config) echo fuzz/FuzzConfig.swift fuzz/Folder/FuzzFolder.swift ;;
        merge) echo fuzz/FuzzMerge.swift fuzz/Folder/FuzzFolder.swift ;;
    esac
}

# Seed files for a target: valid fixtures, the malformed fixtures of that format, hand-made seeds for paths the
# fixtures miss (fuzz/seeds/<target>/) and saved crashers (fuzz/regressions/<target>/).
seeds_for() {
    shopt -s nullglob
    local files=()
    case "$1" in
        safetensors) files=(fixtures/safetensors/*.safetensors fixtures/sharded/*.safetensors
                            fixtures/malformed/st_*) ;;
        numpy) files=(fixtures/npy/*.npy fixtures/malformed/npy_*) ;;
        npz) files=(fixtures/npz/*.npz fixtures/dinov2/*.npz fixtures/malformed/npz_*) ;;
        gguf) files=(fixtures/gguf/*.gguf) ;;
        png) files=(fixtures/png/*.png) ;;
        # config and merge inputs carry a selector/length prefix: their seeds are made by fuzz/make_seeds.py from
        # the fixtures and committed in fuzz/seeds/<target>/.
    esac
    # Saved crashers replay first in every run; FUZZ_SKIP_REGRESSIONS=1 leaves them out (to keep fuzzing while
    # a known crash is still unfixed).
    files+=(fuzz/seeds/"$1"/*)
    [[ "${FUZZ_SKIP_REGRESSIONS:-0}" == 1 ]] || files+=(fuzz/regressions/"$1"/*)
    shopt -u nullglob
    local f
    for f in "${files[@]}"; do [[ -f "$f" && "$(basename "$f")" != README* ]] && echo "$f"; done
}

# Copies the seeds into the working corpus (prefixed, so fixture names stay recognisable; never overwrites).
prepare_corpus() {
    local t="$1" dir="$OUT/corpus-$1" f
    mkdir -p "$dir"
    # Copies of saved crashers stay out of the working corpus when asked to skip them.
    [[ "${FUZZ_SKIP_REGRESSIONS:-0}" == 1 ]] && rm -f "$dir"/seed-fuzz_regressions_*
    while IFS= read -r f; do
        cp -n "$f" "$dir/seed-$(echo "$f" | tr '/' '_')" 2>/dev/null || true
    done < <(seeds_for "$t")
}

# stat_of LOG NAME sum|max: a libFuzzer final statistic (summed or maxed over workers when -jobs is used).
stat_of() {
    { grep -o "stat::$2: *[0-9]*" "$1" || true; } |
        awk -v mode="$3" '{v=$NF; if (mode=="max") {if (v>r) r=v} else r+=v} END{print r+0}'
}

declare -A SUMMARY
FAILED=0

run_target() {
    local t="$1" exe="$OUT/fuzz-$1" corpus="$OUT/corpus-$1" log="$OUT/logs/$1.log"
    prepare_corpus "$t"
    local before after rc=0
    before="$(ls "$OUT/artifacts" | grep -c "^$t-" || true)"
    local args=(-max_len=$MAX_LEN -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
                -artifact_prefix="$OUT/artifacts/$t-")
    local dict="fuzz/dicts/$t.dict"
    [[ "$t" == config ]] && dict=fuzz/dicts/json.dict
    [[ -f "$dict" ]] && args+=(-dict="$dict")
    if [[ "$SECONDS_PER_TARGET" == 0 ]]; then
        echo "== replaying seeds + regressions for $t"
        # Replays each file once (no mutation, corpus unchanged).
        mapfile -t files < <(seeds_for "$t")
        "$exe" "${args[@]}" ${FUZZ_ARGS:-} -runs=1 "${files[@]}" >"$log" 2>&1 || rc=$?
    else
        echo "== fuzzing $t for ${SECONDS_PER_TARGET}s (log: ${log#$ROOT/})"
        "$exe" "${args[@]}" -max_total_time="$SECONDS_PER_TARGET" ${FUZZ_ARGS:-} "$corpus" >"$log" 2>&1 || rc=$?
    fi
    after="$(ls "$OUT/artifacts" | grep -c "^$t-" || true)"
    local new=$((after - before))
    # A replay (or a crash libFuzzer wrote no artifact for) still counts as one crash.
    [[ $rc -ne 0 && $new -eq 0 ]] && new=1
    local execs rate cov ft corp rss
    execs="$(stat_of "$log" number_of_executed_units sum)"
    rate="$(stat_of "$log" average_exec_per_sec sum)"
    rss="$(stat_of "$log" peak_rss_mb max)"
    cov="$( { grep -o 'cov: [0-9]*' "$log" || true; } | tail -1 | awk '{print $2}')"
    ft="$( { grep -o 'ft: [0-9]*' "$log" || true; } | tail -1 | awk '{print $2}')"
    corp="$(ls "$corpus" | wc -l)"
    local status=ok
    if [[ $rc -ne 0 || $new -gt 0 ]]; then
        status="FAILED(rc=$rc)"
        FAILED=1
        grep -m1 -E 'ERROR: (AddressSanitizer|libFuzzer|LeakSanitizer)|Fatal error|SUMMARY' "$log" | sed 's/^/   /' || true
        { ls -t "$OUT/artifacts" | grep "^$t-" || true; } | head -5 | sed "s|^|   artifact: .build-fuzz/artifacts/|"
        echo "   full report: ${log#$ROOT/}"
    fi
    SUMMARY[$t]="$(printf '%-12s execs=%-10s exec/s=%-7s cov=%-6s ft=%-6s corpus=%-5s peak_rss=%sMB crashes=%s %s' \
        "$t" "$execs" "$rate" "${cov:-?}" "${ft:-?}" "$corp" "$rss" "$new" "$status")"
}

build
for t in "${TARGETS[@]}"; do run_target "$t"; done
echo "== summary"
for t in "${TARGETS[@]}"; do echo "${SUMMARY[$t]}"; done
exit $FAILED
