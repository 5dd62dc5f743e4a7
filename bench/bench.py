#!/usr/bin/env python3
"""ckpt vs Python (numpy + safetensors + ml_dtypes) benchmark.

Run through bench/run.sh. See bench/README.md for the methodology.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORK = os.path.join(HERE, "work")
OUTDIR = os.path.join(WORK, "out")
LOGDIR = os.path.join(WORK, "logs")
PYREF = os.path.join(HERE, "pyref.py")

MiB = 1 << 20
RSS_SLACK = 64 * MiB          # goal: ckpt peak RSS <= largest tensor + 64 MiB
INSPECT_TARGET_S = 0.010      # goal: inspect <= 10 ms
F16_SPEEDUP_TARGET = 5.0      # goal: F32->F16 >= 5x faster than Python
F16_GBPS_TARGET = 1.0         # goal: F32->F16 >= 1 GB/s of input


# --------------------------------------------------------------------------
# Test checkpoint

def vit_l_shapes(blocks):
    """timm ViT-L/16 names and shapes (F32)."""
    d, mlp, ncls = 1024, 4096, 1000
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 197, d),
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(blocks):
        p = f"blocks.{i}."
        shapes.update({
            p + "norm1.weight": (d,),
            p + "norm1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d),
            p + "attn.qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d),
            p + "attn.proj.bias": (d,),
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
            p + "mlp.fc1.weight": (mlp, d),
            p + "mlp.fc1.bias": (mlp,),
            p + "mlp.fc2.weight": (d, mlp),
            p + "mlp.fc2.bias": (d,),
        })
    shapes.update({
        "norm.weight": (d,),
        "norm.bias": (d,),
        "head.weight": (ncls, d),
        "head.bias": (ncls,),
    })
    return shapes


def make_checkpoint(path, blocks, seed=20240601):
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    sd = {}
    for name, shape in vit_l_shapes(blocks).items():
        if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
            a = 1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)
        elif name.endswith(".bias"):
            a = 0.01 * rng.standard_normal(shape, dtype=np.float32)
        else:
            a = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        sd[name] = np.ascontiguousarray(a, dtype=np.float32)
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata={"format": "pt", "source": "ckpt bench (synthetic ViT-L/16)"})
    os.replace(tmp, path)


def make_npz(src, path, compressed):
    import numpy as np
    from safetensors.numpy import load_file

    tmp = path + ".tmp.npz"
    (np.savez_compressed if compressed else np.savez)(tmp, **load_file(src))
    os.replace(tmp, path)


def safetensors_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        hdr = json.loads(f.read(n))
    return 8 + n, hdr


def largest_tensor_bytes(path):
    _, hdr = safetensors_header(path)
    return max(v["data_offsets"][1] - v["data_offsets"][0]
               for k, v in hdr.items() if k != "__metadata__")


# --------------------------------------------------------------------------
# Measurement

def preread(*paths):
    """Pull inputs into the page cache so every timed run sees a warm cache."""
    buf = bytearray(16 * MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# Fallback launcher when no C compiler is around: a fresh interpreter without
# site-packages. Its own ~8-10 MiB then becomes the RSS floor (reported).
PY_LAUNCHER = r"""
import os, sys, time
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
err = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
nul = os.open(os.devnull, os.O_RDONLY)
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(nul, 0); os.dup2(out, 1); os.dup2(err, 2)
    try:
        os.execvp(sys.argv[3], sys.argv[3:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
print(f"{wall:.6f} {ru.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""

LAUNCHER = []  # argv prefix, set by setup_launcher()


def setup_launcher(py):
    """Build bench/spawn.c into bench/work/spawn (once); fall back to Python."""
    src = os.path.join(HERE, "spawn.c")
    exe = os.path.join(WORK, "spawn")
    if not (os.path.exists(exe) and os.path.getmtime(exe) >= os.path.getmtime(src)):
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("clang") or shutil.which("gcc")
        if cc:
            r = subprocess.run([cc, "-O2", "-o", exe, src], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"warning: could not build spawn.c: {r.stderr.strip()}")
    if os.access(exe, os.X_OK):
        LAUNCHER[:] = [exe]
        return "bench/spawn.c (C, fork+exec+wait4)"
    LAUNCHER[:] = [py, "-S", "-I", "-c", PY_LAUNCHER]
    return "python -S launcher (fork+exec+wait4; no C compiler found)"


def run_child(cmd, log_prefix):
    """Run cmd as a child; return (wall seconds, peak RSS bytes, exit code).

    The launcher reports ru_maxrss from wait4() on that one child (not
    RUSAGE_CHILDREN). It is a separate small process because Linux carries the
    pre-exec high-water RSS into the child's ru_maxrss; spawning from this
    driver would report the driver's own peak.
    """
    r = subprocess.run(LAUNCHER + [log_prefix + ".out", log_prefix + ".err"] + cmd,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"launcher failed ({r.returncode}): {r.stderr.strip()}")
    wall, rss_kib, code = r.stdout.split()
    return float(wall), int(rss_kib) * 1024, int(code)  # Linux: ru_maxrss in KiB


def rm(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def tail(path, n=20):
    try:
        with open(path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------
# Verification (independent of both tools' readers where possible)

def compare_safetensors_bytes(a, b):
    """Same names, dtypes, shapes and identical tensor bytes."""
    import mmap
    sa, ha = safetensors_header(a)
    sb, hb = safetensors_header(b)
    ka = {k for k in ha if k != "__metadata__"}
    kb = {k for k in hb if k != "__metadata__"}
    if ka != kb:
        return False, f"tensor names differ ({len(ka ^ kb)} not in both)"
    with open(a, "rb") as fa, open(b, "rb") as fb:
        ma = mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ)
        mb = mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            for k in sorted(ka):
                ta, tb = ha[k], hb[k]
                if ta["dtype"] != tb["dtype"] or ta["shape"] != tb["shape"]:
                    return False, f"{k}: {ta['dtype']}{ta['shape']} vs {tb['dtype']}{tb['shape']}"
                oa, ea = ta["data_offsets"]
                ob, eb = tb["data_offsets"]
                if ma[sa + oa:sa + ea] != mb[sb + ob:sb + eb]:
                    return False, f"{k}: tensor bytes differ"
        finally:
            ma.close()
            mb.close()
    same_file = os.path.getsize(a) == os.path.getsize(b) and files_equal(a, b)
    return True, "bit-identical tensors" + ("; identical files" if same_file else "")


def files_equal(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 * MiB), fb.read(16 * MiB)
            if x != y:
                return False
            if not x:
                return True


def compare_npz(a, b):
    """Same members, dtypes, shapes, identical array bytes, same compression."""
    import numpy as np
    with zipfile.ZipFile(a) as za, zipfile.ZipFile(b) as zb:
        ca = {i.filename: i.compress_type for i in za.infolist()}
        cb = {i.filename: i.compress_type for i in zb.infolist()}
    if set(ca) != set(cb):
        return False, "member names differ"
    if ca != cb:
        return False, "member compression differs"
    with np.load(a) as na, np.load(b) as nb:
        for k in na.files:
            x, y = na[k], nb[k]
            if x.dtype != y.dtype or x.shape != y.shape:
                return False, f"{k}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
            if x.tobytes() != y.tobytes():
                return False, f"{k}: array bytes differ"
    same_file = os.path.getsize(a) == os.path.getsize(b) and files_equal(a, b)
    return True, "bit-identical arrays, same compression" + ("; identical files" if same_file else "")


def compare_inspect(py_json, ckpt_json):
    with open(py_json) as f:
        p = json.load(f)
    with open(ckpt_json) as f:
        c = json.load(f)
    pt = {t["name"]: (t["dtype"], list(t["shape"])) for t in p["tensors"]}
    ct = {t["name"]: (t["dtype"], list(t["shape"])) for t in c["tensors"]}
    if pt != ct:
        return False, "tensor list differs"
    if (p.get("metadata") or {}) != (c.get("metadata") or {}):
        return False, "metadata differs"
    return True, f"same {len(pt)} names/dtypes/shapes + metadata"


def ckpt_diff(ckpt, a, b, log_prefix):
    wall, _, rc = run_child([ckpt, "diff", a, b, "--tolerance", "0"], log_prefix)
    return rc == 0, rc


# --------------------------------------------------------------------------
# Operations

class Op:
    def __init__(self, key, title, src, ext, ckpt_args, py_op, repeats, warmup, verify,
                 diff=True):
        self.key, self.title, self.src, self.ext = key, title, src, ext
        self.ckpt_args, self.py_op = ckpt_args, py_op
        self.repeats, self.warmup = repeats, warmup
        self.verify, self.diff = verify, diff


def run_op(op, ckpt, py):
    ck_out = os.path.join(OUTDIR, f"{op.key}.ckpt{op.ext}")
    py_out = os.path.join(OUTDIR, f"{op.key}.py{op.ext}")
    log = os.path.join(LOGDIR, op.key)
    if op.key == "inspect":
        ck_cmd = [ckpt, "inspect", op.src, "--json"]
        py_cmd = [py, PYREF, "inspect", op.src]
    else:
        ck_cmd = [ckpt, "convert", op.src, ck_out] + op.ckpt_args
        py_cmd = [py, PYREF, op.py_op, op.src, py_out]

    preread(op.src)
    res = {"ckpt": [], "python": []}
    total = op.warmup + op.repeats
    for i in range(total):
        last = i == total - 1
        # Interleave the two tools so slow drift (thermal, other load) hits both.
        for tool, cmd, out in (("ckpt", ck_cmd, ck_out), ("python", py_cmd, py_out)):
            rm(out)
            os.sync()  # start each run with no dirty pages from the previous one
            wall, rss, rc = run_child(cmd, f"{log}.{tool}")
            if rc != 0:
                raise SystemExit(f"{op.title}: {tool} exited {rc}: {' '.join(cmd)}\n"
                                 + tail(f"{log}.{tool}.err"))
            if i >= op.warmup:
                res[tool].append((wall, rss))
            if not last and op.key != "inspect":
                rm(out)
        sys.stdout.write(".")
        sys.stdout.flush()
    os.sync()

    # Verify the outputs of the last round.
    if op.key == "inspect":
        ck_out, py_out = f"{log}.ckpt.out", f"{log}.python.out"
    ok, detail = op.verify(py_out, ck_out)
    diff_rc = None
    if op.diff:
        dok, diff_rc = ckpt_diff(ckpt, py_out, ck_out, f"{log}.diff")
        ok = ok and dok
        detail += f"; ckpt diff --tolerance 0 exit {diff_rc}"
    out_sizes = {"ckpt": os.path.getsize(ck_out), "python": os.path.getsize(py_out)}
    if op.key != "inspect":
        rm(ck_out)
        rm(py_out)

    in_bytes = os.path.getsize(op.src)

    def summary(samples):
        walls = [w for w, _ in samples]
        return {
            "median_s": statistics.median(walls),
            "min_s": min(walls),
            "max_s": max(walls),
            "runs_s": walls,
            "peak_rss_bytes": max(r for _, r in samples),
            "gbps": in_bytes / statistics.median(walls) / 1e9,
        }

    return {
        "key": op.key, "title": op.title, "input": os.path.relpath(op.src, REPO),
        "input_bytes": in_bytes, "output_bytes": out_sizes,
        "repeats": op.repeats, "warmup": op.warmup,
        "ckpt_cmd": " ".join(os.path.relpath(c, REPO) if c.startswith("/") else c for c in ck_cmd),
        "python_cmd": " ".join(os.path.relpath(c, REPO) if c.startswith("/") else c for c in py_cmd),
        "ckpt": summary(res["ckpt"]), "python": summary(res["python"]),
        "match": ok, "match_detail": detail,
    }


# --------------------------------------------------------------------------
# Reporting

def add_quiet_machine_options(ap, redo_scope, wait_before):
    """--max-foreign, --max-redo and --idle-wait, shared by the benches that discard disturbed rounds (infer.py's
    and quantize.py's helpers read them)."""
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="a timed round during which other processes used more CPU than this many cores is "
                         "discarded and redone (default 0.25)")
    ap.add_argument("--max-redo", type=int, default=10, help=f"at most this many redone rounds{redo_scope}")
    ap.add_argument("--idle-wait", type=float, default=300,
                    help=f"before {wait_before} and before a redo, wait up to this many seconds for other "
                         "processes to use < 0.1 core (default 300; 0: don't wait)")


def ready_ckpt(path, *dirs):
    """The absolute path of an executable ckpt binary (else exit with how to build it); makes `dirs`."""
    ckpt = os.path.abspath(path)
    if not os.access(ckpt, os.X_OK):
        sys.exit(f"ckpt binary not found: {ckpt} (build it with scripts/build.sh)")
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    return ckpt


def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception as e:  # noqa: BLE001 - informational only
        return f"? ({e})"


def machine_info(ckpt, py):
    cpu = "?"
    mem = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
                    break
    except OSError:
        pass
    vers = sh([py, "-c", "import numpy, safetensors, ml_dtypes, sys; "
               "print(sys.version.split()[0], numpy.__version__, "
               "safetensors.__version__, ml_dtypes.__version__)"]).split()
    vers += ["?"] * (4 - len(vers))
    commit = sh(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    dirty = sh(["git", "-C", REPO, "status", "--porcelain", "--", "Sources", "Package.swift"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "ckpt_version": sh([ckpt, "--version"]),
        "ckpt_binary": os.path.relpath(ckpt, REPO),
        "ckpt_binary_mtime": datetime.datetime.fromtimestamp(
            os.path.getmtime(ckpt), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "swift": sh(["swift", "--version"]).splitlines()[0] if shutil.which("swift") else "?",
        "python": vers[0], "numpy": vers[1], "safetensors": vers[2], "ml_dtypes": vers[3],
        "loadavg_start": os.getloadavg()[0],
        "git_commit": commit + (" (+uncommitted Sources changes)" if dirty else ""),
    }


def fmt_s(s):
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f}"


def render(info, results, mode, big, largest):
    L = []
    L.append(f"### ckpt benchmark ({mode}) — {info['date']}")
    L.append("")
    L.append(f"- machine: {info['nproc']} cores, {info['cpu']}, {info['memory']} RAM, Linux {info['kernel']}; "
             f"1-min load average {info['loadavg_start']:.2f} at start, {info['loadavg_end']:.2f} at end")
    L.append(f"- ckpt {info['ckpt_version']} ({info['ckpt_binary']}, built {info['ckpt_binary_mtime']}), "
             f"git {info['git_commit']}, {info['swift']}")
    L.append(f"- Python {info['python']}, numpy {info['numpy']}, safetensors {info['safetensors']}, "
             f"ml_dtypes {info['ml_dtypes']}")
    L.append(f"- input: {os.path.relpath(big, REPO)}, {os.path.getsize(big) / 1e9:.3f} GB F32; "
             f"largest tensor {largest / MiB:.1f} MiB → RSS goal ≤ {(largest + RSS_SLACK) / MiB:.0f} MiB")
    L.append("- times are medians of the listed runs (warm page cache); ratio = python/ckpt; "
             "GB/s = input bytes / ckpt median (1 GB = 10⁹ B)")
    L.append(f"- RSS = ru_maxrss of that one child (wait4), max over the timed runs; launcher: "
             f"{info['launcher']}, RSS floor (/bin/true) {info['rss_floor_bytes'] / MiB:.1f} MiB")
    L.append(f"- start-up baselines: `ckpt --version` {info['ckpt_startup_s'] * 1000:.1f} ms / "
             f"{info['ckpt_startup_rss_bytes'] / MiB:.0f} MiB; `python -c 'import numpy, safetensors.numpy'` "
             f"{info['python_startup_s'] * 1000:.0f} ms / {info['python_startup_rss_bytes'] / MiB:.0f} MiB")
    L.append("")
    L.append("| operation | ckpt median s | python median s | ratio | ckpt GB/s | ckpt peak RSS MB | python peak RSS MB | outputs match |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        c, p = r["ckpt"], r["python"]
        L.append(table_row(r, [f"{c['gbps']:.2f}", f"{c['peak_rss_bytes'] / MiB:.0f}", f"{p['peak_rss_bytes'] / MiB:.0f}"]))
    L.append("")
    L.append("Targets:")
    by = {r["key"]: r for r in results}

    def mark(ok):
        return "PASS" if ok else "FAIL"
    if "inspect" in by:
        m = by["inspect"]["ckpt"]["median_s"]
        L.append(f"- inspect ≤ 10 ms: {m * 1000:.1f} ms — {mark(m <= INSPECT_TARGET_S)}")
    if "f16" in by:
        r = by["f16"]
        sp = r["python"]["median_s"] / r["ckpt"]["median_s"]
        L.append(f"- F32→F16 ≥ {F16_SPEEDUP_TARGET:.0f}× Python: {sp:.1f}× — {mark(sp >= F16_SPEEDUP_TARGET)}")
        L.append(f"- F32→F16 ≥ {F16_GBPS_TARGET:.0f} GB/s of input: {r['ckpt']['gbps']:.2f} GB/s — "
                 f"{mark(r['ckpt']['gbps'] >= F16_GBPS_TARGET)}")
    L.extend(rss_and_verification_lines(results, largest, "operation"))
    return "\n".join(L)


def finish_run(info, ckpt, ckpt_mtime, t_all):
    """Prints the total time and records the end load average; flags a ckpt binary rebuilt mid-run."""
    print(f"total {time.perf_counter() - t_all:.0f} s\n")
    info["loadavg_end"] = os.getloadavg()[0]
    if os.path.getmtime(ckpt) != ckpt_mtime:
        print("WARNING: the ckpt binary changed during the run; results mix two builds.\n")
        info["ckpt_binary_mtime"] += " (CHANGED during run!)"


def table_row(r, middle):
    """One results row: title and run count, both medians, the ratio, `middle` cells, whether outputs matched."""
    c, p = r["ckpt"], r["python"]
    runs = f"{r['repeats']}" + (f"+{r['warmup']}w" if r["warmup"] else "")
    return (f"| {r['title']} (n={runs}) | {fmt_s(c['median_s'])} | {fmt_s(p['median_s'])} | "
            f"{p['median_s'] / c['median_s']:.1f}× | " + " | ".join(middle) + f" | {'yes' if r['match'] else '**NO**'} |")


def rss_and_verification_lines(rows, largest, noun):
    """The shared tail of a report: the RSS goal (largest tensor + 64 MiB) and each row's verification."""
    goal = largest + RSS_SLACK
    over = [r for r in rows if r["ckpt"]["peak_rss_bytes"] > goal]
    lines = [f"- ckpt peak RSS ≤ largest tensor + 64 MiB ({goal / MiB:.0f} MiB): "
             + (f"PASS for every {noun}" if not over else
                "FAIL for " + ", ".join(f"{r['title']} ({r['ckpt']['peak_rss_bytes'] / MiB:.0f} MiB)" for r in over)),
             "", f"Verification (last run of each {noun}):"]
    lines += [f"- {r['title']}: {'match' if r['match'] else 'MISMATCH'} — {r['match_detail']}" for r in rows]
    return lines + [""]


# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="~100 MB checkpoint (2 blocks) instead of ~1.2 GB (24 blocks)")
    ap.add_argument("--ckpt", default=os.path.join(REPO, ".build", "release", "ckpt"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--only", default="", help="comma-separated op keys "
                    "(inspect,f16,bf16,npz,npz-z,from-npz,from-npz-z)")
    ap.add_argument("--repeats", type=int, default=0,
                    help="override repeats of the fast operations (default 5)")
    args = ap.parse_args()

    ckpt = ready_ckpt(args.ckpt, OUTDIR, LOGDIR)
    py = args.python

    blocks = 2 if args.quick else 24
    mode = "quick" if args.quick else "full"
    big = os.path.join(WORK, f"vit_l16_{blocks}blk_f32.safetensors")
    npz = os.path.join(WORK, f"vit_l16_{blocks}blk_f32.stored.npz")
    npz_z = os.path.join(WORK, f"vit_l16_{blocks}blk_f32.deflated.npz")
    for path, make in ((big, lambda: make_checkpoint(big, blocks)),
                       (npz, lambda: make_npz(big, npz, False)),
                       (npz_z, lambda: make_npz(big, npz_z, True))):
        if not os.path.exists(path):
            print(f"creating {os.path.relpath(path, REPO)} ...", flush=True)
            t = time.perf_counter()
            make()
            print(f"  {os.path.getsize(path) / 1e9:.3f} GB in {time.perf_counter() - t:.1f} s", flush=True)
    largest = largest_tensor_bytes(big)

    fast = args.repeats or 5
    ops = [
        Op("inspect", "inspect --json (header only)", big, ".json", [], "inspect",
           max(fast, 15), 1, compare_inspect, diff=False),
        Op("f16", "F32→F16 safetensors", big, ".safetensors", ["--dtype", "F16"], "f16",
           fast, 1, compare_safetensors_bytes),
        Op("bf16", "F32→BF16 safetensors", big, ".safetensors", ["--dtype", "BF16"], "bf16",
           fast, 1, compare_safetensors_bytes),
        Op("npz", "safetensors→npz (stored)", big, ".npz", [], "npz",
           fast, 1, compare_npz),
        Op("npz-z", "safetensors→npz (deflated)", big, ".npz", ["--compress"], "npz-z",
           3, 0, compare_npz),
        Op("from-npz", "npz (stored)→safetensors", npz, ".safetensors", [], "from-npz",
           fast, 1, compare_safetensors_bytes),
        Op("from-npz-z", "npz (deflated)→safetensors", npz_z, ".safetensors", [], "from-npz",
           3, 0, compare_safetensors_bytes),
    ]
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {o.key for o in ops}
        if unknown:
            sys.exit(f"unknown op(s): {', '.join(sorted(unknown))}")
        ops = [o for o in ops if o.key in keep]

    info = machine_info(ckpt, py)
    info["launcher"] = setup_launcher(py)
    floor = [run_child(["/bin/true"], os.path.join(LOGDIR, "floor"))[1] for _ in range(3)]
    info["rss_floor_bytes"] = max(floor)
    # Process start-up baselines (no file work): what any ckpt / python call costs.
    st = [run_child([ckpt, "--version"], os.path.join(LOGDIR, "startup.ckpt")) for _ in range(11)][1:]
    info["ckpt_startup_s"] = statistics.median(w for w, _, _ in st)
    info["ckpt_startup_rss_bytes"] = max(r for _, r, _ in st)
    st = [run_child([py, "-c", "import numpy, safetensors.numpy"],
                    os.path.join(LOGDIR, "startup.python")) for _ in range(6)][1:]
    info["python_startup_s"] = statistics.median(w for w, _, _ in st)
    info["python_startup_rss_bytes"] = max(r for _, r, _ in st)
    print(f"machine: {info['nproc']} cores, {info['cpu']}, {info['memory']}; "
          f"ckpt {info['ckpt_version']} @ {info['git_commit']}; Python {info['python']}, "
          f"numpy {info['numpy']}, safetensors {info['safetensors']}, ml_dtypes {info['ml_dtypes']}",
          flush=True)

    ckpt_mtime = os.path.getmtime(ckpt)
    results = []
    t_all = time.perf_counter()
    for op in ops:
        sys.stdout.write(f"{op.title:32s} ")
        sys.stdout.flush()
        t = time.perf_counter()
        r = run_op(op, ckpt, py)
        results.append(r)
        print(f" ckpt {fmt_s(r['ckpt']['median_s'])}, python {fmt_s(r['python']['median_s'])}, "
              f"match={'yes' if r['match'] else 'NO'} ({time.perf_counter() - t:.0f} s)", flush=True)
    finish_run(info, ckpt, ckpt_mtime, t_all)

    md = render(info, results, mode, big, largest)
    print(md)
    with open(os.path.join(WORK, f"results-latest-{mode}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(WORK, f"results-latest-{mode}.json"), "w") as f:
        json.dump({"mode": mode, "machine": info, "largest_tensor_bytes": largest,
                   "results": results}, f, indent=1)
    print(f"wrote bench/work/results-latest-{mode}.md and .json")
    return 0 if all(r["match"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
