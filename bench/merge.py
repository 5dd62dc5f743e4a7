#!/usr/bin/env python3
"""ckpt merge vs PEFT (load + merge_and_unload + save) benchmark.

Run through `bench/run.sh merge`. See the "Merge benchmark" section of bench/README.md.
Shares the launcher, timing and reporting helpers with bench.py.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (no side effects on import)
from bench import MiB, REPO, WORK, fmt_s, preread, rm, run_child, tail  # noqa: E402

MWORK = os.path.join(WORK, "merge")
OUTDIR = os.path.join(MWORK, "out")
LOGDIR = os.path.join(MWORK, "logs")
PYMERGE = os.path.join(HERE, "pymerge.py")
BASE = os.path.join(MWORK, "vit_b16_f32.safetensors")
ADAPTER = os.path.join(MWORK, "lora_r16")

RANK, ALPHA = 16, 32
TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
SPEEDUP_TARGET = 5.0          # goal: >= 5x faster than PEFT end to end
RSS_SLACK = 64 * MiB          # same RSS goal as the convert rows: largest tensor + 64 MiB
F32_TOL = 1e-6                # max relative L2 per tensor, ckpt vs PEFT (F32 output)
F16_TOL = 2.0 ** -11          # F16 output: within F16's own rounding (half an ulp, relative)
SEED = 20240601


# --------------------------------------------------------------------------
# Inputs (not timed; cached in bench/work/merge/)

def make_inputs():
    """F32 ViT-B/16 base (timm names) and a PEFT LoRA r=16 on every block linear."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    sys.path.insert(0, os.path.join(REPO, "fixtures", "adapters"))
    import pymerge
    from vit_timm import VisionTransformer

    os.makedirs(MWORK, exist_ok=True)
    torch.manual_seed(SEED)
    model = VisionTransformer(**pymerge.VIT_B16)  # default (seeded) init: kaiming linears, trunc-free zeros
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # no zero/one tensors: biases, LN affine, tokens get random values too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=g))
            elif name in ("cls_token", "pos_embed"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp = BASE + ".tmp"
    save_file(sd, tmp, metadata={"format": "pt", "source": "ckpt bench (synthetic ViT-B/16)"})
    os.replace(tmp, BASE)

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():  # "trained": lora_B is zero at init
        for name, p in pm.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    tmpdir = ADAPTER + ".tmp"
    rm(tmpdir)
    pm.save_pretrained(tmpdir)
    rm(ADAPTER)
    os.replace(tmpdir, ADAPTER)


def st_load(path):
    from safetensors.numpy import load_file
    return load_file(path)


def verify(ck_out, py_out, tol):
    """Names, dtypes, shapes; max relative L2 per tensor between the two, and of each against an F64
    merge computed here from the base and adapter files (W + alpha/r · B·A)."""
    import numpy as np
    c, p = st_load(ck_out), st_load(py_out)
    if set(c) != set(p):
        return False, f"tensor names differ ({len(set(c) ^ set(p))} not in both)", {}
    base = st_load(BASE)
    ad = st_load(os.path.join(ADAPTER, "adapter_model.safetensors"))
    scaling = ALPHA / RANK
    delta = {}
    for k in ad:
        if ".lora_A." in k:
            tgt = k.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
            b = ad[k.replace(".lora_A.", ".lora_B.")].astype(np.float64)
            delta[tgt] = scaling * (b @ ad[k].astype(np.float64))
    worst = {"ckpt_vs_peft": (0.0, ""), "ckpt_vs_f64": (0.0, ""), "peft_vs_f64": (0.0, "")}
    n_exact = 0

    def rel(a, ref):
        ref = ref.astype(np.float64)
        d = np.linalg.norm(a.astype(np.float64) - ref)
        n = np.linalg.norm(ref)
        return float(d / n) if n else float(d)

    for k in sorted(c):
        if c[k].dtype != p[k].dtype or c[k].shape != p[k].shape:
            return False, f"{k}: {c[k].dtype}{c[k].shape} vs {p[k].dtype}{p[k].shape}", {}
        ref = base[k].astype(np.float64) + delta.get(k, 0.0)
        if c[k].tobytes() == p[k].tobytes():
            n_exact += 1
        for key, v in (("ckpt_vs_peft", rel(c[k], p[k])), ("ckpt_vs_f64", rel(c[k], ref)),
                       ("peft_vs_f64", rel(p[k], ref))):
            if v > worst[key][0]:
                worst[key] = (v, k)
    ok = worst["ckpt_vs_peft"][0] <= tol and len(delta) == 48
    d = (f"{len(c)} tensors ({len(delta)} merged), {n_exact} bit-identical; max rel L2 ckpt vs PEFT "
         f"{worst['ckpt_vs_peft'][0]:.2e} ({worst['ckpt_vs_peft'][1] or '-'}; tolerance {tol:.1e}); "
         f"vs F64 merge: ckpt {worst['ckpt_vs_f64'][0]:.2e}, PEFT {worst['peft_vs_f64'][0]:.2e}")
    return ok, d, {k: v[0] for k, v in worst.items()}


# --------------------------------------------------------------------------

def summary(samples):
    walls = [s[0] for s in samples]
    return {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
            "runs_s": walls, "peak_rss_bytes": max(s[1] for s in samples)}


def timed(cmd, log, n, warmup=1, out=None):
    """n timed runs (after `warmup` discarded ones) of one command alone."""
    res = []
    for i in range(warmup + n):
        if out:
            rm(out)
            os.sync()
        wall, rss, rc = run_child(cmd, log)
        if rc != 0:
            raise SystemExit(f"exit {rc}: {' '.join(cmd)}\n" + tail(log + ".err"))
        if i >= warmup:
            res.append((wall, rss))
    if out:
        rm(out)
    return summary(res)


def run_row(key, title, dtype, ckpt, py, repeats, warmup, tol):
    ck_out = os.path.join(OUTDIR, f"{key}.ckpt.safetensors")
    py_out = os.path.join(OUTDIR, f"{key}.py.safetensors")
    log = os.path.join(LOGDIR, key)
    ck_cmd = [ckpt, "merge", BASE, ck_out, "--lora", ADAPTER]
    if dtype != "F32":
        ck_cmd += ["--dtype", dtype]
    py_cmd = [py, PYMERGE, BASE, ADAPTER, py_out, dtype]
    preread(BASE, os.path.join(ADAPTER, "adapter_model.safetensors"))
    res = {"ckpt": [], "python": []}
    phases = []
    total = warmup + repeats
    for i in range(total):
        last = i == total - 1
        for tool, cmd, out in (("ckpt", ck_cmd, ck_out), ("python", py_cmd, py_out)):
            rm(out)
            os.sync()
            wall, rss, rc = run_child(cmd, f"{log}.{tool}")
            if rc != 0:
                raise SystemExit(f"{title}: {tool} exited {rc}: {' '.join(cmd)}\n" + tail(f"{log}.{tool}.err"))
            if i >= warmup:
                res[tool].append((wall, rss))
                if tool == "python":
                    with open(f"{log}.python.out") as f:
                        phases.append(json.loads(f.read().strip().splitlines()[-1]))
            if not last:
                rm(out)
        sys.stdout.write(".")
        sys.stdout.flush()
    os.sync()
    ok, detail, worst = verify(ck_out, py_out, tol)
    sizes = {"ckpt": os.path.getsize(ck_out), "python": os.path.getsize(py_out)}
    rm(ck_out)
    rm(py_out)
    names = list(phases[0]["phases_s"])
    ph = {n: statistics.median(p["phases_s"][n] for p in phases) for n in names}
    return {"key": key, "title": title, "dtype": dtype, "repeats": repeats, "warmup": warmup,
            "ckpt_cmd": rel_cmd(ck_cmd), "python_cmd": rel_cmd(py_cmd), "output_bytes": sizes,
            "ckpt": summary(res["ckpt"]), "python": summary(res["python"]),
            "python_phases_median_s": ph, "python_threads": phases[0]["threads"],
            "match": ok, "match_detail": detail, "worst_rel_l2": worst}


def fmt_dur(s):
    return fmt_s(s) if s < 1 else f"{s:.2f} s"


def rel_cmd(cmd):
    return " ".join(os.path.relpath(c, REPO) if c.startswith("/") else c for c in cmd)


def versions(py):
    code = ("import sys, torch, peft, transformers, safetensors, numpy; print(sys.version.split()[0], "
            "torch.__version__, peft.__version__, transformers.__version__, safetensors.__version__, "
            "numpy.__version__)")
    v = bench.sh([py, "-c", code]).split()
    v += ["?"] * (6 - len(v))
    return dict(zip(("python", "torch", "peft", "transformers", "safetensors", "numpy"), v))


def render(info, rows, refs, largest):
    v = info["versions"]
    L = [f"### ckpt merge vs PEFT — {info['date']}", ""]
    L.append(f"- machine: {info['nproc']} cores, {info['cpu']}, {info['memory']} RAM, Linux {info['kernel']}; "
             f"1-min load average {info['loadavg_start']:.2f} at start, {info['loadavg_end']:.2f} at end")
    L.append(f"- ckpt {info['ckpt_version']} ({info['ckpt_binary']}, built {info['ckpt_binary_mtime']}), "
             f"git {info['git_commit']}")
    L.append(f"- Python {v['python']}, torch {v['torch']} ({rows[0]['python_threads']} threads), peft {v['peft']}, "
             f"transformers {v['transformers']}, safetensors {v['safetensors']}, numpy {v['numpy']}")
    L.append(f"- base: {os.path.relpath(BASE, REPO)}, {info['base_bytes'] / 1e6:.0f} MB F32, "
             f"{info['base_params'] / 1e6:.1f} M params, {info['base_tensors']} tensors; adapter: PEFT LoRA r={RANK}, "
             f"alpha={ALPHA}, qkv/proj/fc1/fc2 of 12 blocks (48 targets), "
             f"{info['adapter_bytes'] / 1e6:.1f} MB; largest tensor {largest / MiB:.1f} MiB")
    L.append("- times: median wall clock of the timed runs, each a fresh process (warm page cache); "
             "ratio = PEFT / ckpt; RSS = ru_maxrss from wait4 (max over the timed runs)")
    L.append(f"- start-up baselines: `ckpt --version` {info['ckpt_startup_s'] * 1000:.1f} ms / "
             f"{info['ckpt_startup_rss_bytes'] / MiB:.0f} MiB; `python -c 'import torch, peft, safetensors.torch'` "
             f"{fmt_dur(info['python_startup_s'])} / {info['python_startup_rss_bytes'] / MiB:.0f} MiB; "
             f"RSS floor (/bin/true via {info['launcher'].split(' ')[0]}) {info['rss_floor_bytes'] / MiB:.1f} MiB")
    L.append("")
    L.append("| merge | ckpt median s | PEFT median s | ratio | ckpt peak RSS MiB | PEFT peak RSS MiB | "
             "max rel L2 ckpt vs PEFT | outputs match |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        c, p = r["ckpt"], r["python"]
        L.append(bench.table_row(r, [f"{c['peak_rss_bytes'] / MiB:.0f}", f"{p['peak_rss_bytes'] / MiB:.0f}",
                                     f"{r['worst_rel_l2'].get('ckpt_vs_peft', float('nan')):.1e}"]))
    L.append("")
    if refs:
        L.append("ckpt alone, same base (where its time goes):")
        for name, s in refs.items():
            L.append(f"- `{name}`: {fmt_dur(s['median_s'])} median (n={len(s['runs_s'])}), "
                     f"peak RSS {s['peak_rss_bytes'] / MiB:.0f} MiB")
        L.append("")
    L.append("PEFT phases (median seconds since interpreter start, cumulative):")
    for r in rows:
        ph = r["python_phases_median_s"]
        prev, parts = 0.0, []
        for n, t in ph.items():
            parts.append(f"{n} {t - prev:.2f}")
            prev = t
        L.append(f"- {r['title']}: " + ", ".join(parts) + f" (end {prev:.2f} s; process exit adds the rest)")
    L.append("")
    L.append("Targets:")
    for r in rows:
        sp = r["python"]["median_s"] / r["ckpt"]["median_s"]
        L.append(f"- {r['title']}: ≥ {SPEEDUP_TARGET:.0f}× PEFT end to end: {sp:.1f}× — "
                 f"{'PASS' if sp >= SPEEDUP_TARGET else 'FAIL'}")
    L.extend(bench.rss_and_verification_lines(rows, largest, "row"))
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", default=os.path.join(REPO, ".build", "release", "ckpt"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--only", default="", help="comma-separated rows (f32,f16)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per row (default 5, +1 warm-up)")
    ap.add_argument("--no-refs", action="store_true", help="skip the ckpt-only reference timings")
    args = ap.parse_args()

    ckpt = bench.ready_ckpt(args.ckpt, OUTDIR, LOGDIR)
    py = args.python
    if not (os.path.exists(BASE) and os.path.exists(os.path.join(ADAPTER, "adapter_model.safetensors"))):
        print(f"creating {os.path.relpath(BASE, REPO)} and {os.path.relpath(ADAPTER, REPO)}/ ...", flush=True)
        t = time.perf_counter()
        # In a child so the driver stays small (its RSS does not matter, but its page-cache pressure does).
        r = subprocess.run([py, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import merge; merge.make_inputs()",
                            HERE])
        if r.returncode:
            sys.exit("making the inputs failed")
        print(f"  done in {time.perf_counter() - t:.1f} s", flush=True)

    _, hdr = bench.safetensors_header(BASE)
    tensors = {k: v for k, v in hdr.items() if k != "__metadata__"}
    largest = bench.largest_tensor_bytes(BASE)

    rows_def = [("f32", "F32 out", "F32", F32_TOL), ("f16", "F16 out (--dtype F16 / .half())", "F16", F16_TOL)]
    if args.only:
        keep = set(args.only.split(","))
        if keep - {r[0] for r in rows_def}:
            sys.exit(f"unknown row(s): {', '.join(sorted(keep - {r[0] for r in rows_def}))}")
        rows_def = [r for r in rows_def if r[0] in keep]

    info = bench.machine_info(ckpt, py)
    ckpt_mtime = os.path.getmtime(ckpt)  # machine_info recorded this build's time
    info["versions"] = versions(py)
    info["base_bytes"] = os.path.getsize(BASE)
    info["base_tensors"] = len(tensors)
    info["base_params"] = sum(math.prod(v["shape"]) for v in tensors.values())
    info["adapter_bytes"] = os.path.getsize(os.path.join(ADAPTER, "adapter_model.safetensors"))
    info["launcher"] = bench.setup_launcher(py)
    info["rss_floor_bytes"] = max(run_child(["/bin/true"], os.path.join(LOGDIR, "floor"))[1] for _ in range(3))
    st = timed([ckpt, "--version"], os.path.join(LOGDIR, "startup.ckpt"), 10)
    info["ckpt_startup_s"], info["ckpt_startup_rss_bytes"] = st["median_s"], st["peak_rss_bytes"]
    st = timed([py, "-c", "import torch, peft, safetensors.torch"], os.path.join(LOGDIR, "startup.python"), 5)
    info["python_startup_s"], info["python_startup_rss_bytes"] = st["median_s"], st["peak_rss_bytes"]
    v = info["versions"]
    print(f"machine: {info['nproc']} cores, {info['cpu']}; ckpt {info['ckpt_version']} @ {info['git_commit']}; "
          f"Python {v['python']}, torch {v['torch']}, peft {v['peft']}; load average {info['loadavg_start']:.2f}",
          flush=True)

    t_all = time.perf_counter()
    refs = {}
    if not args.no_refs:
        preread(BASE, os.path.join(ADAPTER, "adapter_model.safetensors"))
        n = max(args.repeats, 5)
        out = os.path.join(OUTDIR, "ref.safetensors")
        for name, cmd, o in (
                ("ckpt merge --dry-run", [ckpt, "merge", BASE, out, "--lora", ADAPTER, "--dry-run"], None),
                ("ckpt convert base out.safetensors (copy, no merge)", [ckpt, "convert", BASE, out], out),
                ("ckpt convert base out.safetensors --dtype F16", [ckpt, "convert", BASE, out, "--dtype", "F16"], out)):
            sys.stdout.write(f"{name:52s} ")
            sys.stdout.flush()
            refs[name] = timed(cmd, os.path.join(LOGDIR, "ref"), n, out=o)
            print(f"{fmt_s(refs[name]['median_s'])}", flush=True)

    rows = []
    for key, title, dtype, tol in rows_def:
        sys.stdout.write(f"{title:52s} ")
        sys.stdout.flush()
        t = time.perf_counter()
        r = run_row(key, title, dtype, ckpt, py, args.repeats, 1, tol)
        rows.append(r)
        print(f" ckpt {fmt_s(r['ckpt']['median_s'])}, PEFT {fmt_s(r['python']['median_s'])}, "
              f"{r['python']['median_s'] / r['ckpt']['median_s']:.1f}×, match={'yes' if r['match'] else 'NO'} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    bench.finish_run(info, ckpt, ckpt_mtime, t_all)

    md = render(info, rows, refs, largest)
    print(md)
    with open(os.path.join(WORK, "results-latest-merge.md"), "w") as f:
        f.write(md)
    with open(os.path.join(WORK, "results-latest-merge.json"), "w") as f:
        json.dump({"machine": info, "largest_tensor_bytes": largest, "refs": refs, "results": rows}, f, indent=1)
    print("wrote bench/work/results-latest-merge.md and .json")
    return 0 if all(r["match"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
