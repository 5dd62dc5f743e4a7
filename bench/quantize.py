#!/usr/bin/env python3
"""ckpt quantize vs gguf-py and mlx: quantization speed, file to file, on the synthetic ViT-L/16 F32 checkpoint.

Run through `bench/run.sh quantize`. See the "Quantization" section of bench/README.md.
Shares the checkpoint (bench.py), the launcher (spawn.c: fresh process, peak RSS from wait4), the reporting helpers
and the noise control (infer.py: other processes' CPU per round, disturbed rounds redone) with the other benches.
"""
import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (no side effects on import)
from bench import MiB, REPO, WORK, fmt_s, preread, rm, run_child, tail  # noqa: E402
from infer import own_cpu_s, system_busy_s, wait_idle  # noqa: E402
from merge import rel_cmd, timed  # noqa: E402

QWORK = os.path.join(WORK, "quantize")
OUTDIR = os.path.join(QWORK, "out")
LOGDIR = os.path.join(QWORK, "logs")
PYQUANT = os.path.join(HERE, "pyquant.py")

GGUF_SPEEDUP_TARGET = 20.0    # goal: ckpt >= 20x gguf-py (Q8_0 and Q4_0), file to file
MLX_SPEEDUP_TARGET = 1.0      # goal: ckpt >= 1x mlx (4-bit g64 RTN), file to file
HQQ_RATIO_TARGET = 3.0        # goal: ckpt --method hqq <= 3x --method rtn
BITS, GROUP = 4, 64


# --------------------------------------------------------------------------
# What is run

class Tool:
    def __init__(self, key, title, cmd, out, kind):
        self.key, self.title, self.cmd, self.out, self.kind = key, title, cmd, out, kind  # kind: ckpt | py


class Item:
    def __init__(self, key, title, tools, verify, baseline=None):
        self.key, self.title, self.tools, self.verify = key, title, tools, verify
        self.baseline = baseline  # the tool the others are compared with (methods: ckpt rtn)


def items(ckpt, py, src):
    o = lambda name: os.path.join(OUTDIR, name)  # noqa: E731
    q = [ckpt, "quantize", src]
    mlx_args = ["--format", "mlx", "--bits", str(BITS), "--group-size", str(GROUP)]
    result = []
    for t in ("Q8_0", "Q4_0"):
        k = t.lower()
        result.append(Item(f"gguf-{k}", f"GGUF {t}", [
            Tool("ckpt", f"ckpt --format gguf --gguf-type {t}",
                 q + [o(f"{k}.ckpt.gguf"), "--format", "gguf", "--gguf-type", t, "--json"], o(f"{k}.ckpt.gguf"), "ckpt"),
            Tool("gguf-py", f"gguf-py {gguf_version()} (quants.quantize + GGUFWriter)",
                 [py, PYQUANT, "gguf", src, o(f"{k}.py.gguf"), t], o(f"{k}.py.gguf"), "py"),
        ], verify_gguf))
    result.append(Item("mlx", f"MLX {BITS}-bit g{GROUP} RTN", [
        Tool("ckpt", f"ckpt --format mlx --bits {BITS} --group-size {GROUP}",
             q + [o("mlx.ckpt"), *mlx_args, "--json"], o("mlx.ckpt"), "ckpt"),
        Tool("mlx", f"mlx {mlx_version()} CPU (mx.quantize + save_safetensors)",
             [py, PYQUANT, "mlx", src, o("mlx.py"), str(BITS), str(GROUP)], o("mlx.py"), "py"),
    ], verify_mlx))
    result.append(Item("methods", f"ckpt MLX {BITS}-bit g{GROUP}: rtn vs hqq vs mse", [
        Tool(m, f"ckpt --method {m}", q + [o(f"m-{m}.ckpt"), *mlx_args, "--method", m, "--json"], o(f"m-{m}.ckpt"), "ckpt")
        for m in ("rtn", "hqq", "mse")
    ], verify_methods, baseline="rtn"))
    result.append(Item("io", "ckpt alone, no quantization (I/O reference)", [
        Tool("convert-gguf", "ckpt convert IN out.gguf (F32 GGUF: read all, write all)",
             [ckpt, "convert", src, o("io.gguf")], o("io.gguf"), "ckpt-plain"),
        Tool("convert-st", "ckpt convert IN out.safetensors (copy)",
             [ckpt, "convert", src, o("io.safetensors")], o("io.safetensors"), "ckpt-plain"),
    ], verify_none))
    return result


_VERSIONS = {}


def gguf_version():
    return _VERSIONS.get("gguf", "?")


def mlx_version():
    return _VERSIONS.get("mlx", "?")


def versions(py):
    code = ("import sys, numpy, safetensors, gguf, mlx.core as mx; from importlib.metadata import version; "
            "print(sys.version.split()[0], numpy.__version__, safetensors.__version__, version('gguf'), mx.__version__)")
    v = bench.sh([py, "-c", code]).split()
    v += ["?"] * (5 - len(v))
    return dict(zip(("python", "numpy", "safetensors", "gguf", "mlx"), v))


# --------------------------------------------------------------------------
# Measurement

def out_bytes(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)


def last_json(path):
    try:
        with open(path) as f:
            lines = f.read().strip().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def run_item(item, rounds, warmup, max_foreign, max_redo, idle_wait_s):
    """warmup + rounds rounds; each round runs every tool of the item once (fresh process, order rotating every
    round). A timed round during which other processes used more than `max_foreign` cores (measured over the tool
    runs only, not the rm/sync between them) is discarded and redone, at most `max_redo` times."""
    runs = {t.key: [] for t in item.tools}
    log_rounds = []
    redo_left = max_redo
    i = 0
    while i < warmup + rounds:
        n = len(log_rounds)
        order = item.tools[n % len(item.tools):] + item.tools[:n % len(item.tools)]
        recs, busy_other, busy_wall, load = {}, 0.0, 0.0, os.getloadavg()[0]
        steal = 0.0
        for tool in order:
            rm(tool.out)
            os.sync()  # no dirty pages from the previous run
            log = os.path.join(LOGDIR, f"{item.key}.{tool.key}")
            sys0, st0 = system_busy_s()
            own0 = own_cpu_s()
            wall, rss, rc = run_child(tool.cmd, log)
            own = own_cpu_s() - own0
            sys1, st1 = system_busy_s()
            busy_other += max(0.0, (sys1 - sys0) - own)
            busy_wall += wall
            steal += st1 - st0
            if rc != 0:
                raise SystemExit(f"{item.title}: {tool.title} exited {rc}: {rel_cmd(tool.cmd)}\n" + tail(log + ".err"))
            j = last_json(log + ".out") if tool.kind in ("ckpt", "py") else {}
            recs[tool.key] = {"wall_s": wall, "rss_bytes": rss, "cpu_s": own, "json": j}
            sys.stdout.write(f" {tool.key} {fmt_s(wall)}")
            sys.stdout.flush()
        foreign = busy_other / busy_wall if busy_wall > 0 else 0.0
        timed_round = i >= warmup
        disturbed = foreign > max_foreign
        keep = not (timed_round and disturbed and redo_left > 0)
        log_rounds.append({"loadavg": load, "foreign_cores": foreign, "steal_cores": steal / max(busy_wall, 1e-9),
                           "order": [t.key for t in order], "warmup": not timed_round, "kept": keep,
                           "disturbed": disturbed, "wall_s": {k: r["wall_s"] for k, r in recs.items()}})
        label = "warm-up" if not timed_round else ("timed" if keep else "DISCARDED, disturbed")
        print(f"   [round {n + 1}: {label}; load {load:.2f}, other processes {foreign:.2f} cores]", flush=True)
        if keep:
            if timed_round:
                for k, r in recs.items():
                    runs[k].append(r)
            i += 1
        else:
            redo_left -= 1
            w = wait_idle(idle_wait_s) if idle_wait_s > 0 else 0
            print(f"   redoing it ({redo_left} redos left; waited {w:.0f} s for idle)", flush=True)
        if i < warmup + rounds:
            sys.stdout.write(" " * 4)
    return runs, log_rounds


def summarise(tool, samples):
    walls = [s["wall_s"] for s in samples]
    d = {"title": tool.title, "cmd": rel_cmd(tool.cmd), "median_s": statistics.median(walls), "min_s": min(walls),
         "max_s": max(walls), "runs_s": walls, "peak_rss_bytes": max(s["rss_bytes"] for s in samples),
         "cpu_median_s": statistics.median(s["cpu_s"] for s in samples), "cpu_runs_s": [s["cpu_s"] for s in samples],
         "cpu_per_wall_median": statistics.median(s["cpu_s"] / s["wall_s"] for s in samples),
         "output_bytes": out_bytes(tool.out)}
    js = [s["json"] for s in samples]
    if tool.kind == "ckpt" and js and all("seconds" in j for j in js):
        d["in_process_median_s"] = statistics.median(j["seconds"] for j in js)
        d["in_process_runs_s"] = [j["seconds"] for j in js]
        q = [t for t in js[-1].get("tensors", []) if t.get("quantized")]
        d["quantized_tensors"] = len(q)
        d["mean_sqnr_db"] = statistics.fmean(t["sqnr_db"] for t in q) if q else None
    if tool.kind == "py" and js and all("phases_s" in j for j in js):
        names = list(js[0]["phases_s"])
        d["phases_median_s"] = {n: statistics.median(j["phases_s"][n] for j in js) for n in names}
        d["in_process_median_s"] = d["phases_median_s"][names[-1]]
        d["quantize_only_median_s"] = statistics.median(j["quantize_s"] for j in js)
        d["quantize_only_runs_s"] = [j["quantize_s"] for j in js]
        d["quantized_tensors"] = len(js[-1]["quantized"])
    return d


# --------------------------------------------------------------------------
# Verification (last run of each tool)

def ckpt_quantized(item):
    j = last_json(os.path.join(LOGDIR, f"{item.key}.{item.tools[0].key}.out"))
    return [t["name"] for t in j.get("tensors", []) if t.get("quantized")]


def peer_quantized(item):
    return last_json(os.path.join(LOGDIR, f"{item.key}.{item.tools[1].key}.out")).get("quantized", [])


def same_selection(item):
    c, p = set(ckpt_quantized(item)), set(peer_quantized(item))
    if c != p:
        return False, (f"quantized sets differ: {len(c)} by ckpt, {len(p)} by the peer, "
                       f"{len(c ^ p)} not in both (e.g. {sorted(c ^ p)[:3]})")
    return True, f"the same {len(c)} tensors quantized by both (ckpt --json report vs the peer's list)"


def verify_gguf(item):
    import gguf
    ok, sel = same_selection(item)
    ra, rb = gguf.GGUFReader(item.tools[0].out), gguf.GGUFReader(item.tools[1].out)
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    if set(ta) != set(tb):
        return False, f"blocks identical: no — tensor names differ ({len(set(ta) ^ set(tb))} not in both); {sel}", {}
    quant = [n for n in ta if ta[n].tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)]
    same_q = same_kept = 0
    first_bad = None
    for n in sorted(ta):
        a, b = ta[n], tb[n]
        eq = (a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape)
              and a.data.tobytes() == b.data.tobytes())
        if n in quant:
            same_q += eq
        else:
            same_kept += eq
        if not eq and first_bad is None:
            first_bad = f"{n} ({a.tensor_type.name}{list(a.shape)} vs {b.tensor_type.name}{list(b.shape)})"
    blocks = same_q == len(quant) and len(quant) > 0
    kept_n = len(ta) - len(quant)
    detail = (f"blocks identical: {'yes' if blocks else 'no'} — {same_q}/{len(quant)} quantized tensors have the "
              f"same block bytes (GGUFReader on both files), {same_kept}/{kept_n} kept tensors identical"
              + (f"; first difference: {first_bad}" if first_bad else "") + f"; {sel}")
    return ok and blocks and same_kept == kept_n, detail, {"blocks_identical": blocks, "quantized": len(quant)}


def _safetensors_tensors(path):
    start, hdr = bench.safetensors_header(path)
    return start, {k: v for k, v in hdr.items() if k != "__metadata__"}


def verify_mlx(item):
    import mmap
    ok, sel = same_selection(item)
    a_path = os.path.join(item.tools[0].out, "model.safetensors")
    b_path = os.path.join(item.tools[1].out, "model.safetensors")
    sa, ha = _safetensors_tensors(a_path)
    sb, hb = _safetensors_tensors(b_path)
    if set(ha) != set(hb):
        return False, f"scales identical: no — tensor names differ ({len(set(ha) ^ set(hb))} not in both); {sel}", {}
    counts = {"weight": [0, 0], "scales": [0, 0], "biases": [0, 0], "kept": [0, 0]}
    modules = {k[: -len(".scales")] for k in ha if k.endswith(".scales")}
    first_bad = None
    with open(a_path, "rb") as fa, open(b_path, "rb") as fb:
        ma = mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ)
        mb = mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            for k in sorted(ha):
                x, y = ha[k], hb[k]
                (oa, ea), (ob, eb) = x["data_offsets"], y["data_offsets"]
                eq = (x["dtype"] == y["dtype"] and x["shape"] == y["shape"]
                      and ma[sa + oa:sa + ea] == mb[sb + ob:sb + eb])
                mod, _, leaf = k.rpartition(".")
                kind = leaf if mod in modules and leaf in ("weight", "scales", "biases") else "kept"
                counts[kind][0] += eq
                counts[kind][1] += 1
                if not eq and first_bad is None:
                    first_bad = f"{k} ({x['dtype']}{x['shape']} vs {y['dtype']}{y['shape']})"
        finally:
            ma.close()
            mb.close()
    all_eq = all(c[0] == c[1] for c in counts.values()) and counts["scales"][1] > 0
    detail = (f"scales identical: {'yes' if counts['scales'][0] == counts['scales'][1] else 'no'} — "
              f"byte-identical tensors, ckpt vs mlx: scales {counts['scales'][0]}/{counts['scales'][1]}, "
              f"biases {counts['biases'][0]}/{counts['biases'][1]}, packed uint32 weights "
              f"{counts['weight'][0]}/{counts['weight'][1]}, kept {counts['kept'][0]}/{counts['kept'][1]}"
              + (f"; first difference: {first_bad}" if first_bad else "") + f"; {sel}")
    return ok and all_eq, detail, {"counts": counts}


def verify_methods(item):
    """Every method quantized the same tensors and wrote the same tensor names, dtypes and shapes as rtn."""
    reports = {t.key: last_json(os.path.join(LOGDIR, f"{item.key}.{t.key}.out")) for t in item.tools}
    sets = {k: {t["name"] for t in r.get("tensors", []) if t.get("quantized")} for k, r in reports.items()}
    layouts = {}
    for t in item.tools:
        _, h = _safetensors_tensors(os.path.join(t.out, "model.safetensors"))
        layouts[t.key] = {k: (v["dtype"], v["shape"]) for k, v in h.items()}
    ok = all(s == sets["rtn"] and s for s in sets.values()) and all(l == layouts["rtn"] for l in layouts.values())
    sq = {k: statistics.fmean(t["sqnr_db"] for t in r["tensors"] if t.get("quantized")) for k, r in reports.items()}
    detail = (f"{len(sets['rtn'])} tensors quantized by each method, same tensor names/dtypes/shapes in all three "
              f"files" if ok else "methods quantized different tensors or wrote different layouts")
    detail += "; mean SQNR " + ", ".join(f"{k} {v:.2f} dB" for k, v in sq.items())
    return ok, detail, {"mean_sqnr_db": sq}


def verify_none(item):
    return True, "not compared (reference timings only)", {}


# --------------------------------------------------------------------------
# Reporting

def fmt_dur(s):
    return fmt_s(s) if s < 1 else f"{s:.2f} s"


def render(info, res, mode, src):
    v = info["versions"]
    L = [f"### ckpt quantize vs gguf-py and mlx ({mode}) — {info['date']}", ""]
    L.append(f"- machine: {info['nproc']} cores, {info['cpu']}, {info['memory']} RAM, Linux {info['kernel']}; "
             f"1-min load average {info['loadavg_start']:.2f} at start, {info['loadavg_end']:.2f} at end")
    L.append(f"- ckpt {info['ckpt_version']} ({info['ckpt_binary']}, built {info['ckpt_binary_mtime']}), "
             f"git {info['git_commit']}")
    L.append(f"- Python {v['python']}, numpy {v['numpy']}, safetensors {v['safetensors']}, gguf-py {v['gguf']}, "
             f"mlx {v['mlx']} (CPU)")
    L.append(f"- input: {os.path.relpath(src, REPO)}, {os.path.getsize(src) / 1e9:.3f} GB F32 (synthetic ViT-L/16, "
             f"bench.py); warm page cache (read once, untimed)")
    L.append(f"- each round runs every tool of a row once, a fresh process each (order rotates every round); "
             f"times are medians of {info['rounds']} timed round(s)"
             + (f" after {info['warmup']} warm-up round(s)" if info["warmup"] else "")
             + "; output deleted and `sync` before every run; peak RSS = ru_maxrss from wait4 (max over the timed "
             "runs); CPU/wall = the process's user+sys CPU over its wall time")
    L.append(f"- start-up baselines: `ckpt --version` {fmt_dur(info['startup']['ckpt']['median_s'])}; "
             f"`python -c 'import numpy, safetensors.numpy, gguf'` {fmt_dur(info['startup']['gguf']['median_s'])}; "
             f"`python -c 'import mlx.core'` {fmt_dur(info['startup']['mlx']['median_s'])}")
    rounds = [(k, r) for k, x in res.items() for r in x["rounds"]]
    kept = [r for _, r in rounds if r["kept"] and not r["warmup"]]
    dropped = [r for _, r in rounds if not r["kept"]]
    L.append(f"- CPU used by other processes during the timed rounds: "
             + ", ".join(f"{r['foreign_cores']:.2f}" for r in kept) + " cores"
             + (f"; {len(dropped)} round(s) discarded and redone for > {info['max_foreign']:.2f} core" if dropped
                else "; no round redone"))
    busy = [r for r in kept if r["disturbed"]]
    if busy:
        L.append(f"- **WARNING:** {len(busy)} of {len(kept)} timed rounds ran while other processes used > "
                 f"{info['max_foreign']:.2f} core (max {max(r['foreign_cores'] for r in busy):.2f}): "
                 "**provisional numbers**, rerun on an idle machine")
    L.append("")
    L.append("| row | tool | median wall | min–max | ckpt ÷ peer | peak RSS MiB | CPU s (÷ wall) | in-process | "
             "quantize only | output MB |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in ("gguf-q8_0", "gguf-q4_0", "mlx"):
        if key not in res:
            continue
        r = res[key]
        tools = r["tools"]
        ck, peer = list(tools.values())
        sp = peer["median_s"] / ck["median_s"]
        for i, t in enumerate((ck, peer)):
            L.append(f"| {r['title'] if i == 0 else ''} | {t['title']} | {fmt_dur(t['median_s'])} | "
                     f"{fmt_dur(t['min_s'])}–{fmt_dur(t['max_s'])} | {f'**{sp:.1f}×**' if i == 0 else '—'} | "
                     f"{t['peak_rss_bytes'] / MiB:.0f} | {t['cpu_median_s']:.2f} ({t['cpu_per_wall_median']:.2f}) | "
                     f"{fmt_dur(t['in_process_median_s']) if 'in_process_median_s' in t else '—'} | "
                     f"{fmt_dur(t['quantize_only_median_s']) if 'quantize_only_median_s' in t else '—'} | "
                     f"{t['output_bytes'] / 1e6:.0f} |")
    L.append("")
    L.append("CPU s = user + sys CPU seconds of the process (median; ÷ wall in brackets, 2.00 = both cores busy); "
             "less sensitive than wall time to other load, so compare it too when the machine was busy. "
             "in-process: ckpt = its --json `seconds` (open input → output published); peers = interpreter start → "
             "file written (`pyquant.py` phase marks). quantize only: peers' time inside `gguf.quants.quantize` "
             "(summed over tensors) or from the first `mx.quantize` to the end of its `mx.eval`. "
             "ckpt has no separate compute time: it streams, and also dequantizes each tensor again for its SQNR "
             "report.")
    for key in ("gguf-q8_0", "gguf-q4_0", "mlx"):
        if key not in res:
            continue
        peer = list(res[key]["tools"].values())[1]
        ph, prev, parts = peer.get("phases_median_s", {}), 0.0, []
        for n, x in ph.items():
            parts.append(f"{n} {x - prev:.2f}")
            prev = x
        q = peer.get("quantize_only_median_s")
        L.append(f"- {res[key]['title']}, {peer['title'].split(' (')[0]} phases (median s): " + ", ".join(parts)
                 + (f"; of that, quantize calls {q:.2f} s = {100 * q / peer['median_s']:.0f} % of its wall time, "
                    f"the rest is start-up, reading, {'GGUF' if key.startswith('gguf') else 'safetensors'} "
                    f"writing and exit" if q is not None else ""))
    if "methods" in res:
        r = res["methods"]
        m = r["tools"]
        L.append("")
        L.append(f"{r['title']} (same rounds, interleaved):")
        L.append("")
        L.append("| method | median wall | min–max | ÷ rtn | in-process | peak RSS MiB | CPU s (÷ wall) | mean SQNR dB |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for k, t in m.items():
            L.append(f"| {k} | {fmt_dur(t['median_s'])} | {fmt_dur(t['min_s'])}–{fmt_dur(t['max_s'])} | "
                     f"{t['median_s'] / m['rtn']['median_s']:.2f}× | {fmt_dur(t['in_process_median_s'])} | "
                     f"{t['peak_rss_bytes'] / MiB:.0f} | {t['cpu_median_s']:.2f} ({t['cpu_per_wall_median']:.2f}) | "
                     f"{t['mean_sqnr_db']:.2f} |")
    if "io" in res:
        L.append("")
        L.append("ckpt alone on the same input, no quantization (how much of a row is reading and writing):")
        for k, t in res["io"]["tools"].items():
            L.append(f"- `{t['title']}`: {fmt_dur(t['median_s'])} median, {t['cpu_median_s']:.2f} CPU s, "
                     f"{t['output_bytes'] / 1e6:.0f} MB written, peak RSS {t['peak_rss_bytes'] / MiB:.0f} MiB")
    L.append("")
    L.append("Targets:")

    def mark(ok):
        return "PASS" if ok else "FAIL"
    for key, name in (("gguf-q8_0", "Q8_0"), ("gguf-q4_0", "Q4_0")):
        if key in res:
            ck, peer = list(res[key]["tools"].values())
            sp = peer["median_s"] / ck["median_s"]
            L.append(f"- GGUF {name}: ckpt ≥ {GGUF_SPEEDUP_TARGET:.0f}× gguf-py end to end: {sp:.1f}× — "
                     f"{mark(sp >= GGUF_SPEEDUP_TARGET)} (CPU seconds: {peer['cpu_median_s'] / ck['cpu_median_s']:.1f}×)")
    if "mlx" in res:
        ck, peer = list(res["mlx"]["tools"].values())
        sp = peer["median_s"] / ck["median_s"]
        L.append(f"- MLX {BITS}-bit g{GROUP}: ckpt ≥ {MLX_SPEEDUP_TARGET:.0f}× mlx end to end: {sp:.2f}× — "
                 f"{mark(sp >= MLX_SPEEDUP_TARGET)} (CPU seconds: {peer['cpu_median_s'] / ck['cpu_median_s']:.2f}×)")
    if "methods" in res:
        m = res["methods"]["tools"]
        hq = m["hqq"]["median_s"] / m["rtn"]["median_s"]
        ms = m["mse"]["median_s"] / m["rtn"]["median_s"]
        L.append(f"- HQQ ≤ {HQQ_RATIO_TARGET:.0f}× RTN: {hq:.2f}× — {mark(hq <= HQQ_RATIO_TARGET)} "
                 f"(MSE: {ms:.2f}× RTN, no target)")
    L.append("")
    L.append("Verification (last run of each tool):")
    for key, r in res.items():
        if key != "io":
            L.append(f"- {r['title']}: {'match' if r['match'] else 'MISMATCH'} — {r['match_detail']}")
    L.append("")
    return "\n".join(L)


# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="~100 MB checkpoint (2 blocks) instead of ~1.2 GB (24 blocks)")
    ap.add_argument("--ckpt", default=os.path.join(REPO, ".build", "release", "ckpt"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=5,
                    help="timed rounds per row (default 5)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="discarded rounds before the timed ones (default 0: the input is read once, untimed)")
    ap.add_argument("--only", default="", help="comma-separated rows (gguf-q8_0,gguf-q4_0,mlx,methods,io)")
    ap.add_argument("--no-refs", action="store_true", help="skip the ckpt convert I/O reference row (io)")
    bench.add_quiet_machine_options(ap, " per row (default 10; 0: keep every round, disturbed ones are flagged)",
                                    "each row")
    args = ap.parse_args()
    if args.rounds < 1 or args.warmup < 0:
        sys.exit("--rounds must be >= 1 and --warmup >= 0")

    ckpt = bench.ready_ckpt(args.ckpt, OUTDIR, LOGDIR)
    py = args.python

    blocks = 2 if args.quick else 24
    mode = "quick" if args.quick else "full"
    src = os.path.join(WORK, f"vit_l16_{blocks}blk_f32.safetensors")
    if not os.path.exists(src):
        print(f"creating {os.path.relpath(src, REPO)} ...", flush=True)
        t = time.perf_counter()
        bench.make_checkpoint(src, blocks)
        print(f"  {os.path.getsize(src) / 1e9:.3f} GB in {time.perf_counter() - t:.1f} s", flush=True)

    info = bench.machine_info(ckpt, py)
    ckpt_mtime = os.path.getmtime(ckpt)
    _VERSIONS.update(versions(py))
    info["versions"] = dict(_VERSIONS)
    info["launcher"] = bench.setup_launcher(py)
    info.update(rounds=args.rounds, warmup=args.warmup, max_foreign=args.max_foreign)
    all_items = items(ckpt, py, src)
    keep = set(args.only.split(",")) if args.only else {i.key for i in all_items} - ({"io"} if args.no_refs else set())
    unknown = keep - {i.key for i in all_items}
    if unknown:
        sys.exit(f"unknown row(s): {', '.join(sorted(unknown))}")
    todo = [i for i in all_items if i.key in keep]

    # Start-up baselines; they also pull the interpreter, numpy, gguf and mlx libraries into the page cache.
    info["startup"] = {
        "ckpt": timed([ckpt, "--version"], os.path.join(LOGDIR, "startup.ckpt"), 5),
        "gguf": timed([py, "-c", "import numpy, safetensors.numpy, gguf"], os.path.join(LOGDIR, "startup.gguf"), 3),
        "mlx": timed([py, "-c", "import mlx.core"], os.path.join(LOGDIR, "startup.mlx"), 3),
    }
    v = info["versions"]
    print(f"machine: {info['nproc']} cores, {info['cpu']}; ckpt {info['ckpt_version']} @ {info['git_commit']}; "
          f"Python {v['python']}, gguf-py {v['gguf']}, mlx {v['mlx']}; load average {info['loadavg_start']:.2f}",
          flush=True)
    preread(src, ckpt)

    t_all = time.perf_counter()
    res = {}
    for item in todo:
        if args.idle_wait > 0:
            w = wait_idle(args.idle_wait)
            if w > 6:
                print(f"waited {w:.0f} s for the machine to go idle", flush=True)
        sys.stdout.write(f"{item.title}:\n   ")
        sys.stdout.flush()
        t = time.perf_counter()
        runs, rounds = run_item(item, args.rounds, args.warmup, args.max_foreign, args.max_redo, args.idle_wait)
        tools = {tl.key: summarise(tl, runs[tl.key]) for tl in item.tools}
        ok, detail, extra = item.verify(item)
        res[item.key] = {"title": item.title, "tools": tools, "rounds": rounds, "match": ok, "match_detail": detail,
                         "verify": extra}
        if item.key != "io":
            print(f"   {'match' if ok else 'MISMATCH'}: {detail}")
        print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)
        for tl in item.tools:
            rm(tl.out)
    bench.finish_run(info, ckpt, ckpt_mtime, t_all)

    md = render(info, res, mode, src)
    print(md)
    name = "results-latest-quantize" + ("-quick" if args.quick else "")
    with open(os.path.join(WORK, name + ".md"), "w") as f:
        f.write(md)
    with open(os.path.join(WORK, name + ".json"), "w") as f:
        json.dump({"mode": mode, "machine": info, "input": os.path.relpath(src, REPO),
                   "input_bytes": os.path.getsize(src), "results": res}, f, indent=1)
    print(f"wrote bench/work/{name}.md and .json")
    return 0 if all(r["match"] for r in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
