#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py) from a checkout. Where the machine's python already
# imports torch (a GPU machine, a cluster node without network), it runs with that python as it
# is and nothing is installed; elsewhere .venv is set up first.
#   bash scripts/gpu_check.sh [OUT_DIR] [extra gpu_check.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check}; shift || true
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  bash scripts/setup.sh
  PY=.venv/bin/python
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
PYTHONUNBUFFERED=1 exec "$PY" scripts/gpu_check.py --out "$out" "$@"
