"""Weight + activation quantization quality on the bundled model (issue 24's table): `bench/quality.py --activations`.

Rows are W/A pairs (default W8A8, W6A6, W4A4); columns are calibration sources:
  gaussian      ckpt synthesize --method noise   (Gaussian noise in normalised pixel space)
  smooth        ckpt synthesize --method smooth  (the weight-only path's smooth noise)
  psaq          ckpt synthesize --method psaq    (PSAQ-ViT: patch-similarity entropy + CE + TV)
  spdfq         ckpt synthesize --method spdfq   (APA + MSR + SL)
  spdfq-no-apa / spdfq-no-msr / spdfq-no-sl      (the ablation: one term off)
  real32        the first 32 unlabelled Fashion-MNIST training images of fixtures/eval/fmnist_calibration.npz
Every synthetic set is 32 images from seed --seed, made once and cached in .cache/quality/calibration/ with its
synthesis JSON (wall time included); a rerun reuses it. Each cell runs
  ckpt quantize MODEL OUT --format dequantized --bits W --activation-bits A --calibration SET --head HEAD [--extra]
  ckpt eval OUT --head HEAD --data DATA --json --save-logits L
and prints accuracy / top-1 agreement with F32 / mean KL(F32 || quantized), then pairs every column of a row with
real32 and with gaussian image by image (McNemar's exact test: images only one of the two gets right).
"""
import json, shlex, subprocess, tempfile, time
from pathlib import Path

import numpy as np

SOURCES = ["gaussian", "smooth", "psaq", "spdfq", "spdfq-no-apa", "spdfq-no-msr", "spdfq-no-sl", "real32"]
ROWS = [(8, 8), (6, 6), (4, 4)]
SYNTHESIS = {  # source → (ckpt synthesize --method, extra flags)
    "gaussian": ("noise", []), "smooth": ("smooth", []), "psaq": ("psaq", []), "spdfq": ("spdfq", []),
    "spdfq-no-apa": ("spdfq", ["--no-attention-priors"]), "spdfq-no-msr": ("spdfq", ["--no-regions"]),
    "spdfq-no-sl": ("spdfq", ["--no-soft-labels"]),
}


def calibration_set(q, source, seed, images):
    """(path, synthesis seconds) of a source's calibration images, synthesised once into .cache/quality/calibration/."""
    if source == "real32":
        return q.CALIBRATION, 0.0
    method, flags = SYNTHESIS[source]
    folder = q.ROOT / ".cache/quality/calibration"
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{source}-n{images}-s{seed}"
    npz, report = stem.with_suffix(".npz"), stem.with_suffix(".json")
    if not (npz.exists() and report.exists()):
        print(f"synthesising {images} {source} images (seed {seed}) …", flush=True)
        start = time.monotonic()
        out = subprocess.run([str(q.CKPT), "synthesize", str(q.MODEL), str(npz), "--head", str(q.HEAD), "--method", method,
                              "--images", str(images), "--seed", str(seed), "--json", "--preview", str(stem.with_suffix(".png"))] + flags,
                             check=True, capture_output=True, text=True).stdout
        result = json.loads(out)
        result["wall_seconds"] = time.monotonic() - start
        report.write_text(json.dumps(result) + "\n")
    result = json.loads(report.read_text())
    return npz, float(result.get("wall_seconds", result.get("seconds", 0.0)))


def run(q, args):
    rows = [tuple(map(int, x.split(":"))) for x in args.rows.split(",")] if args.rows else ROWS
    sources = args.sources.split(",") if args.sources else SOURCES
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise SystemExit(f"--sources: unknown {', '.join(unknown)} (known: {', '.join(SOURCES)})")
    extra = shlex.split(args.extra or "")
    labels = np.load(q.DATA)["labels"][: args.limit or None]
    cells, predictions = [], {}
    with tempfile.TemporaryDirectory(dir=q.ROOT / ".cache") as tmp:
        tmp = Path(tmp)
        base = q.reference(tmp / "f32.npy", args.limit)
        ref = np.load(tmp / "f32.npy")
        print(f"F32: accuracy {base['accuracy']:.4f} on {base['n']} images; quantize flags: {' '.join(extra) or '(defaults)'}", flush=True)
        for source in sources:
            path, synthesis_seconds = calibration_set(q, source, args.seed, 32)
            for w, a in rows:
                out = tmp / f"w{w}a{a}-{source}"
                command = [str(q.CKPT), "quantize", str(q.MODEL), str(out), "--format", "dequantized", "--bits", str(w),
                           "--activation-bits", str(a), "--calibration", str(path), "--calibration-images", "32",
                           "--head", str(q.HEAD), "--json"] + extra
                report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                r = q.evaluate(out, tmp / "q.npy", args.limit)
                logits = np.load(tmp / "q.npy")
                agree, kl = q.compare(ref, logits)
                predictions[(w, a, source)] = logits.argmax(1)
                cells.append(dict(weight_bits=w, activation_bits=a, source=source, accuracy=r["accuracy"], agreement=agree, kl=kl,
                                  synthesis_seconds=synthesis_seconds, calibration_seconds=report["calibration_seconds"],
                                  activation_range=report["activation_range"], method=report["method"], flags=extra,
                                  predictions=logits.argmax(1).tolist()))
                if args.out:
                    tmp_out = args.out.with_name(args.out.name + ".tmp")
                    tmp_out.write_text(json.dumps(dict(f32_accuracy=base["accuracy"], n=base["n"], cells=cells)) + "\n")
                    tmp_out.replace(args.out)
                print(f"W{w}A{a} {source:13s}: accuracy {r['accuracy']:.4f} ({100 * (r['accuracy'] - base['accuracy']):+.1f} pt), "
                      f"agreement {agree:.4f}, KL {kl:.4f}; calibration {report['calibration_seconds']:.1f} s", flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=True)
    print(f"\nF32 {100 * base['accuracy']:.1f} % on {base['n']} images. Cells: accuracy / agreement / KL (%, %, nats).\n")
    print("| | " + " | ".join(sources) + " |\n|---|" + "---|" * len(sources))
    for w, a in rows:
        row = []
        for s in sources:
            c = next(c for c in cells if (c["weight_bits"], c["activation_bits"], c["source"]) == (w, a, s))
            row.append(f"{100 * c['accuracy']:.1f} / {100 * c['agreement']:.1f} / {c['kl']:.3f}")
        print(f"| W{w}A{a} | " + " | ".join(row) + " |")
    times = {s: next(c["synthesis_seconds"] for c in cells if c["source"] == s) for s in sources}
    print("| synthesis (s) | " + " | ".join(f"{times[s]:.0f}" for s in sources) + " |")
    for anchor in ("real32", "gaussian"):
        if anchor not in sources or len(sources) < 2:
            continue
        print(f"\nPaired against {anchor} on the same {len(labels)} images (only this right : only {anchor} right, sign-test p):")
        for w, a in rows:
            base_right = predictions[(w, a, anchor)] == labels
            parts = []
            for s in sources:
                if s == anchor:
                    continue
                right = predictions[(w, a, s)] == labels
                wins, losses = int(np.sum(right & ~base_right)), int(np.sum(base_right & ~right))
                parts.append(f"{s} {wins} : {losses} (p = {q.sign_test(wins, losses):.2g})")
            print(f"- W{w}A{a}: " + "; ".join(parts))
