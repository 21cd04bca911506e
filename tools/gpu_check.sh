#!/usr/bin/env bash
# lopd's GPU check: real-vocabulary rollout, scoring, tensor parallelism and training memory on this machine,
# in one JSON file (tools/results/gpu_check.json). See tools/gpu_check.py; `--dry-run` exercises it on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then LOPD_ENGINE=cuda bash tools/setup.sh; else bash tools/setup.sh; fi
fi
# 8 minutes of measurement plus start-up on a GPU; a CPU dry run (shared cores) may take longer.
exec timeout "${GPU_CHECK_TIMEOUT:-600}" .venv/bin/python tools/gpu_check.py "$@"
