#!/usr/bin/env bash
# On a CUDA machine: set up, then run correctness (bf16 vs fp32) and the MFU benchmark in one go.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python scripts/gpu_check.py --json "${1:-gpu_check.json}"
python scripts/bench_train.py --device cuda --precision bf16 --compile --d-model 768 --n-layers 12 \
    --n-heads 12 --seq-len 1024 --batch 16 --vocab 32768 --steps 30 --json "${2:-bench_train_gpu.json}"
