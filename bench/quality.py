#!/usr/bin/env python3
"""Weight-only quantization quality on the bundled model: DINOv2-S/14 + the Fashion-MNIST linear head.

For each setting (bits x group size) and method (rtn, mse, hqq) this runs
  ckpt quantize MODEL OUT --format dequantized --bits B --group-size G --method M
  ckpt eval OUT --head HEAD --data DATA --json --save-logits L
and prints accuracy, top-1 agreement with F32 and the mean softmax KL(F32 || quantized) over the eval set.
The dequantized (affine) weights are exactly what the MLX layout stores, so the numbers hold for --format mlx.

With --gptq every run adds GPTQ error compensation from ckpt's data-free calibration (synthetic images through the
model itself); --gptq --calibration-data calibrates on unlabelled in-domain images instead (by default the 128
Fashion-MNIST training images of fixtures/eval/fmnist_calibration.npz, disjoint from the eval set); --settings
restricts the settings (e.g. 4:64,3:64).

With --activations it measures weight + activation quantization instead (W8A8/W6A6/W4A4 rows against calibration
sources: Gaussian, smooth, PSAQ-style, SPDFQ and its ablations, 32 real images; see bench/quality_activations.py):
  bench/quality.py --activations [--rows 8:8,4:4] [--sources spdfq,real32] [--extra 'QUANTIZE FLAGS'] [--seed S]

With --sensitivity it instead measures how sensitive the probe is: the same metrics for F16 and BF16 round trips of
all weights (ckpt convert) and for W4 g64 RTN applied to one kind of Linear layer at a time (--only).

With --eval-images N the evaluation runs on the first N images of Debian's Fashion-MNIST test set (t10k; N up to
10,000; the first 1,000 are the committed eval set) instead of fixtures/eval/fmnist_eval.npz: more images, less
noise (~0.07 s an image on 2 otherwise idle cores: ~12 minutes a cell for all 10,000). Every table also prints, for
each method against RTN, the images only one of the two gets right and the exact two-sided sign-test p-value of that
split (McNemar's exact test). --out writes the rows after every cell, each with its per-image predictions, so a long
run's finished cells survive it and can be paired later.

Usage: bench/quality.py [--limit N | --eval-images N] [--out results.json] [--gptq [--calibration-data [NPZ] | --calibration-seed S]
       [--[no-]act-order] [--[no-]sequential]] [--settings B:G,...] [--methods M,...] [--sensitivity]   (run scripts/build.sh and scripts/demo.sh
first; $CKPT overrides the binary)
"""
import argparse, json, math, os, subprocess, sys, tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CKPT = Path(os.environ.get("CKPT", ROOT / ".build/release/ckpt"))
MODEL = ROOT / ".cache/dinov2/dinov2-small-224"
HEAD = ROOT / "fixtures/eval/fmnist_head.safetensors"
DEFAULT_DATA = DATA = ROOT / "fixtures/eval/fmnist_eval.npz"
CALIBRATION = ROOT / "fixtures/eval/fmnist_calibration.npz"  # unlabelled Fashion-MNIST train images
SETTINGS = [(8, 64), (6, 64), (4, 128), (4, 64), (4, 32), (3, 64), (2, 64)]
METHODS = ["rtn", "mse", "hqq"]


def log_softmax(x):
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def test_set(n):
    """The first n Fashion-MNIST test images and labels as an eval npz in .cache/eval/ (made once), read with the
    eval fixture's own Debian reader."""
    path = ROOT / f".cache/eval/fmnist_t10k_{n}.npz"
    if not path.exists():
        sys.path.insert(0, str(ROOT / "fixtures" / "eval"))
        import generate  # noqa: E402  (fixtures/eval/generate.py: its imports are light; the heavy ones are lazy)

        images, labels = generate.fmnist("t10k", n)
        if not 0 < n <= len(labels):
            sys.exit(f"--eval-images {n}: the test set has {len(labels)} images")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        tmp.rename(path)
    return path


def sign_test(a, b):
    """Exact two-sided p-value of a split a : b of the discordant images under 'both methods equally good'."""
    n, k = a + b, min(a, b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def evaluate(model, logits_path, limit):
    cmd = [str(CKPT), "eval", str(model), "--head", str(HEAD), "--data", str(DATA), "--json", "--save-logits", str(logits_path)]
    if limit:
        cmd += ["--limit", str(limit)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def reference(logits_path, limit):
    """The F32 model's evaluation, cached in .cache/quality/ (keyed by --limit) while the model and the binary
    are older than the cache: every table starts from the same 1,000-image forward pass."""
    cache = ROOT / ".cache/quality"
    cache.mkdir(parents=True, exist_ok=True)
    stem = cache / (f"f32-{limit or 'all'}" + ("" if DATA == DEFAULT_DATA else f"-{DATA.stem}"))
    newest = max(p.stat().st_mtime for p in [CKPT, MODEL / "model.safetensors", HEAD, DATA])
    if stem.with_suffix(".json").exists() and stem.with_suffix(".json").stat().st_mtime > newest:
        subprocess.run(["cp", str(stem.with_suffix(".npy")), str(logits_path)], check=True)
        return json.loads(stem.with_suffix(".json").read_text())
    result = evaluate(MODEL, logits_path, limit)
    subprocess.run(["cp", str(logits_path), str(stem.with_suffix(".npy"))], check=True)
    stem.with_suffix(".json").write_text(json.dumps(result))
    return result


def compare(ref, logits):
    """(top-1 agreement, mean KL(ref || logits)) of two logit matrices."""
    lp, lq = log_softmax(ref), log_softmax(logits)
    return float(np.mean(logits.argmax(1) == ref.argmax(1))), float((np.exp(lp) * (lp - lq)).sum(1).mean())


# Linear layers of the bundled model (Hugging Face Dinov2 names), one --only pattern per kind
LAYER_KINDS = [("query", r"attention\.attention\.query"), ("key", r"attention\.attention\.key"),
               ("value", r"attention\.attention\.value"), ("attention output", r"attention\.output\.dense"),
               ("mlp fc1", r"mlp\.fc1"), ("mlp fc2", r"mlp\.fc2")]


def sensitivity(limit):
    """F16/BF16 round trips of every weight, and W4 g64 RTN on one kind of layer at a time."""
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
        tmp = Path(tmp)
        base = reference(tmp / "f32.npy", limit)
        ref = np.load(tmp / "f32.npy")
        print(f"F32: accuracy {base['accuracy']:.4f} on {base['n']} images\n")
        print("| weights changed | accuracy | agreement | KL |\n|---|---|---|---|")
        runs = [(f"all, {d} round trip", ["convert", str(MODEL), str(tmp / f"{d}.safetensors"), "--dtype", d], tmp / f"{d}.safetensors")
                for d in ("F16", "BF16")]
        runs += [(f"{kind} only, W4 g64 RTN", ["quantize", str(MODEL), str(tmp / "q"), "--format", "dequantized", "--bits", "4",
                                               "--group-size", "64", "--only", pattern], tmp / "q") for kind, pattern in LAYER_KINDS]
        for label, command, model in runs:
            subprocess.run(["rm", "-rf", str(model)], check=True)
            subprocess.run([str(CKPT), *command], check=True, capture_output=True)
            r = evaluate(model, tmp / "q.npy", limit)
            agree, kl = compare(ref, np.load(tmp / "q.npy"))
            print(f"| {label} | {100 * r['accuracy']:.1f} | {100 * agree:.1f} | {kl:.4f} |", flush=True)


def save(path, base, rows, predictions):
    """The rows so far, each with its per-image predictions (for pairing methods later), written atomically."""
    cells = [dict(r, predictions=predictions[(r["bits"], r["group"], r["method"])].tolist()) for r in rows]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(f32_accuracy=base["accuracy"], n=base["n"], rows=cells)) + "\n")
    tmp.replace(path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--eval-images", type=int, help="evaluate on the first N Fashion-MNIST test images (Debian t10k) instead of the committed 1,000")
    p.add_argument("--out", type=Path)
    p.add_argument("--sensitivity", action="store_true")
    p.add_argument("--gptq", action="store_true", help="add GPTQ error compensation (data-free calibration)")
    p.add_argument("--calibration-data", type=Path, nargs="?", const=CALIBRATION,
                   help=f"with --gptq: calibrate on these unlabelled images (default {CALIBRATION.relative_to(ROOT)})")
    p.add_argument("--settings", help="comma list of BITS:GROUP (default: all)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of methods (default: rtn,mse,hqq)")
    # Unset: ckpt's own default (both on).
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None, help="with --gptq: act-order or plain column order")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="with --gptq: layer-by-layer calibration, or every layer's inputs from the unquantized model")
    p.add_argument("--calibration-seed", type=int, help="with --gptq and synthetic images: their seed (ckpt's default otherwise)")
    p.add_argument("--activations", action="store_true", help="weight + activation quantization: the W/A × calibration-source table")
    p.add_argument("--rows", help="with --activations: comma list of W:A (default 8:8,6:6,4:4)")
    p.add_argument("--sources", help="with --activations: comma list of calibration sources (default: all)")
    p.add_argument("--seed", type=int, default=0, help="with --activations: the synthetic sets' seed (default 0)")
    p.add_argument("--extra", help="with --activations: more ckpt quantize flags for every cell, e.g. '--activation-range minmax'")
    a = p.parse_args()
    methods = a.methods.split(",")
    if a.eval_images is not None:
        if a.limit:
            p.error("--eval-images and --limit are alternatives")
        global DATA
        DATA = test_set(a.eval_images)
    if a.sensitivity:
        return sensitivity(a.limit)
    if a.activations:
        import quality_activations  # noqa: E402  (bench/quality_activations.py)

        return quality_activations.run(sys.modules[__name__], a)
    settings = [tuple(map(int, x.split(":"))) for x in a.settings.split(",")] if a.settings else SETTINGS
    if (a.calibration_data or a.act_order is not None or a.sequential is not None or a.calibration_seed is not None) and not a.gptq:
        p.error("--calibration-data, --[no-]act-order, --[no-]sequential and --calibration-seed apply to --gptq")
    if a.calibration_data and a.calibration_seed is not None:
        p.error("--calibration-seed is for synthetic images")
    extra = ["--gptq"] if a.gptq else []
    extra += ["--calibration-data", str(a.calibration_data)] if a.calibration_data else []
    extra += [] if a.act_order is None else ["--act-order" if a.act_order else "--no-act-order"]
    extra += [] if a.sequential is None else ["--sequential" if a.sequential else "--no-sequential"]
    extra += [] if a.calibration_seed is None else ["--calibration-seed", str(a.calibration_seed)]
    rows, predictions = [], {}
    labels = np.load(DATA)["labels"][: a.limit or None]
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
        tmp = Path(tmp)
        base = reference(tmp / "f32.npy", a.limit)
        ref = np.load(tmp / "f32.npy")
        print(f"F32: accuracy {base['accuracy']:.4f} on {base['n']} images", flush=True)
        for bits, group in settings:
            for method in methods:
                out = tmp / f"w{bits}g{group}-{method}"
                q = subprocess.run([str(CKPT), "quantize", str(MODEL), str(out), "--format", "dequantized", "--bits", str(bits),
                                    "--group-size", str(group), "--method", method, "--json"] + extra,
                                   check=True, capture_output=True, text=True).stdout
                report = json.loads(q)
                # What ckpt used (its defaults depend on the calibration source).
                act_order, sequential = bool(report.get("act_order")), bool(report.get("sequential"))
                label = (" + GPTQ" + (" act-order" if act_order else " plain-order") + (" sequential" if sequential else " one-pass")
                         + (" (data)" if a.calibration_data else f" (synthetic{'' if a.calibration_seed is None else f', seed {a.calibration_seed}'})")) if a.gptq else ""
                sqnr = np.mean([t["sqnr_db"] for t in report["tensors"] if t["quantized"]])
                r = evaluate(out, tmp / "q.npy", a.limit)
                logits = np.load(tmp / "q.npy")
                agree, kl = compare(ref, logits)
                predictions[(bits, group, method)] = logits.argmax(1)
                row = dict(bits=bits, group=group, method=method, gptq=a.gptq, act_order=act_order, sequential=sequential, calibration_seed=a.calibration_seed,
                           calibration=str(a.calibration_data) if a.calibration_data else ("synthetic" if a.gptq else None), accuracy=r["accuracy"], agreement=agree, kl=kl,
                           sqnr_db=float(sqnr), quantize_seconds=report["seconds"])
                rows.append(row)
                if a.out:  # after every cell, so a long run's finished cells survive an interruption
                    save(a.out, base, rows, predictions)
                print(f"W{bits} g{group} {method:3s}{label}: accuracy {r['accuracy']:.4f} (F32 {base['accuracy']:.4f}, "
                      f"{100 * (r['accuracy'] - base['accuracy']):+.1f} pt), agreement {agree:.4f}, KL {kl:.4f}, "
                      f"mean SQNR {sqnr:.2f} dB", flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=True)
    print("\n| setting | " + " | ".join(f"{m.upper()}{label} acc / agree / KL" for m in methods) + " |")
    print("|---|" + "---|" * len(methods))
    for bits, group in settings:
        cells = []
        for m in methods:
            r = next(x for x in rows if x["bits"] == bits and x["group"] == group and x["method"] == m)
            cells.append(f"{100 * r['accuracy']:.1f} / {100 * r['agreement']:.1f} / {r['kl']:.3f}")
        print(f"| W{bits} g{group} | " + " | ".join(cells) + " |")
    print(f"| F32 | {100 * base['accuracy']:.1f} |")
    if "rtn" in methods and len(methods) > 1:
        print(f"\nPaired against RTN on the same {len(labels)} images (only the other right : only RTN right, sign-test p):")
        for bits, group in settings:
            rtn = predictions[(bits, group, "rtn")] == labels
            cells = []
            for m in methods:
                if m == "rtn":
                    continue
                other = predictions[(bits, group, m)] == labels
                wins, losses = int(np.sum(other & ~rtn)), int(np.sum(rtn & ~other))
                cells.append(f"{m.upper()} {wins} : {losses} (p = {sign_test(wins, losses):.2f})")
            print(f"- W{bits} g{group}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
