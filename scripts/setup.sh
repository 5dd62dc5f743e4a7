#!/usr/bin/env bash
# Installs what ckpt needs on a fresh Debian machine: the system libraries (OpenBLAS, zlib, pkg-config) and a
# Python venv (.venv) with the reference libraries the interop tests compare against. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=()
# dataset-fashion-mnist: the eval fixtures' --check rebuilds the committed eval and calibration sets from it.
for pkg in libopenblas-dev zlib1g-dev pkg-config dataset-fashion-mnist; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
pkg-config --exists openblas zlib || { echo "setup: pkg-config cannot find openblas/zlib" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# `pip freeze` is read whole: with `grep -q` the pipe can close early, and pip's broken pipe then fails the
# pipeline under pipefail and reinstalls everything for nothing.
frozen() { .venv/bin/pip freeze 2>/dev/null || true; }
if ! .venv/bin/python -c "import numpy, safetensors, ml_dtypes, huggingface_hub, onnx, pytest, gguf, mlx.core" 2>/dev/null \
    || ! frozen | grep -x "numpy==2.4.6" >/dev/null || ! frozen | grep -x "mlx==0.32.4" >/dev/null; then
    echo "setup: installing Python packages into .venv"
    .venv/bin/pip install -q -r scripts/requirements.txt
fi
# PEFT/transformers on CPU torch: the reference for adapter merging (fixtures and interop tests); compressed-tensors
# (needs torch) reads back ckpt's pack-quantized files. The CPU wheel
# comes from the machine image's pip find-links; PyPI only has multi-GB CUDA builds.
if ! frozen | grep -x "peft==0.21.2" >/dev/null || ! frozen | grep -x "torch==2.13.0+cpu" >/dev/null \
    || ! frozen | grep -x "compressed-tensors==0.20.0" >/dev/null; then
    echo "setup: installing torch (CPU), transformers and peft into .venv"
    .venv/bin/pip install -q -r scripts/requirements-torch.txt
fi
# llm-compressor's GPTQ is the reference for ckpt's (fixtures/quant). Its package pins other transformers and
# compressed-tensors versions and imports `datasets` at the top, so it is installed without dependencies and the
# fixture script loads its two GPTQ modules alone (torch and compressed-tensors are all they need).
if ! frozen | grep -x "llmcompressor==0.14.0.1" >/dev/null; then
    echo "setup: installing llmcompressor (no dependencies) into .venv"
    .venv/bin/pip install -q --no-deps llmcompressor==0.14.0.1
fi
echo "setup: ok (swift $(swift --version 2>/dev/null | head -1 | sed 's/.*version \([0-9.]*\).*/\1/'), $(pkg-config --modversion openblas 2>/dev/null || echo openblas), $(.venv/bin/python --version))"
