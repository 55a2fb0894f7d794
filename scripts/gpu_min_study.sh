#!/usr/bin/env bash
# One gpu-min study on one GPU machine, in one call (docs/studies.md#gpu-min):
#
#   bash scripts/gpu_min_study.sh NAME        # NAME: shape, annealing, ablation or wsd
#
# Uses the machine's own python3 (torch, tokenizers, numpy, pyarrow; no venv, no pip, no network,
# no `datasets`) with PYTHONPATH at this checkout. Steps: the plan (its time estimate), the corpus
# made from the Python sources installed there (timed on its own, kept under $TESTBED_CACHE, not
# $OUT, so a second study on the same machine reuses it), `testbed study run NAME --size gpu-min`,
# then the plan again (now with the prepared corpus's counts). Into $OUT (default ./gpu-min-out):
# NAME.log, NAME-figures.json (the study's figures: the plan's estimate beside the measured wall
# time in `invocations`, the corpus record in `corpora`) and NAME-report.md.
set -uo pipefail

NAME=${1:?usage: bash scripts/gpu_min_study.sh NAME (shape, annealing, ablation or wsd)}
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TESTBED_CACHE=${TESTBED_CACHE:-$HOME/.cache/testbed}
OUT=${OUT:-$ROOT/gpu-min-out}
STUDY=${STUDY_DIR:-${TMPDIR:-/tmp}/gpu-min-studies/$NAME}
mkdir -p "$OUT"
LOG="$OUT/$NAME.log"

{
    echo "== $(date -u +%FT%TZ) gpu-min study $NAME; $($PY --version 2>&1); cache $TESTBED_CACHE"
    nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
    echo "== plan (before the corpus: its size is a lower estimate)"
    $PY -m testbed study plan "$NAME" --size gpu-min || echo "(the plan names a problem above)"
    echo "== corpus: the installed Python sources"
    start=$(date +%s)
    $PY -c "from testbed.study import corpus; corpus.installed_corpus()" || exit 1
    echo "corpus ready in $(( $(date +%s) - start )) s"
    echo "== study run"
    start=$(date +%s)
    $PY -m testbed study run "$NAME" --size gpu-min --out "$STUDY"
    status=$?
    echo "study run: exit $status after $(( $(date +%s) - start )) s"
    echo "== plan (with the prepared corpus)"
    $PY -m testbed study plan "$NAME" --size gpu-min || true
    exit $status
} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}

for file in figures.json report.md; do
    [ -f "$STUDY/$file" ] && cp "$STUDY/$file" "$OUT/$NAME-$file"
done
exit "$status"
