"""Interleaved A/B timing of two (or more) ckpt binaries on the GGUF rows (exploration, not run by CI).

    .venv/bin/python bench/explore/ab_gguf.py BIN_A,BIN_B Q4_0 12

Runs `BIN quantize IN out.gguf --format gguf --gguf-type TYPE --json` N times per binary, alternating their order
every round, with the output deleted and `sync` before each run (as bench/quantize.py does), on bench/work's ViT-L/16
checkpoint (made by `bench/run.sh quantize`). Prints each binary's median wall time and median user/sys CPU: on a
VM whose speed drifts over minutes, only binaries measured in the same interleaved run are compared.
"""
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "bench", "work", "vit_l16_24blk_f32.safetensors")


def main():
    binaries, gguf_type, rounds = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3])
    out = os.path.join(ROOT, "bench", "work", f"ab.{gguf_type}.gguf")
    runs = {b: [] for b in binaries}
    for i in range(rounds):
        for binary in binaries if i % 2 == 0 else binaries[::-1]:
            if os.path.exists(out):
                os.remove(out)
            os.sync()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run([binary, "quantize", SOURCE, out, "--format", "gguf", "--gguf-type", gguf_type, "--json"],
                           stdout=subprocess.DEVNULL, check=True)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            runs[binary].append((wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime))
    if os.path.exists(out):
        os.remove(out)
    for binary, samples in runs.items():
        wall, user, system = (statistics.median(s[k] for s in samples) for k in range(3))
        print(f"{binary}: wall median {wall * 1e3:.0f} ms (min {min(s[0] for s in samples) * 1e3:.0f}), "
              f"user {user:.3f} s, sys {system:.3f} s")


if __name__ == "__main__":
    main()
