#!/usr/bin/env bash
# The main job on a fresh machine: set up, train the smoke sweep on the built-in synthetic
# language, fit a Chinchilla law to it and draw the plots. Rerunning skips finished runs.
#   SWEEP=configs/sweeps/smoke.yaml OUT=runs/smoke WORKERS=2 bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP=${SWEEP:-configs/sweeps/smoke.yaml}
OUT=${OUT:-runs/smoke}
WORKERS=${WORKERS:-2}
bash scripts/setup.sh
. .venv/bin/activate
testbed sweep plan "$SWEEP" --device cpu
testbed sweep run "$SWEEP" --sweep-dir "$OUT" --executor local --workers "$WORKERS"
testbed sweep status "$OUT"
testbed fit collect "$OUT" --out "$OUT/table.csv"
testbed fit "$OUT" --law chinchilla --holdout largest --out "$OUT/fit"
echo
echo "runs (metrics.jsonl, checkpoints/, wandb/ each): $OUT/runs/"
echo "tidy table of every checkpoint: $OUT/table.csv"
echo "fit report and plots: $OUT/fit/report.md, $OUT/fit/*.png"
