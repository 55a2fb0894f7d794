#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
# TEST_WORKERS parallel pytest workers (default 2), each given whole test files (--dist
# loadfile: a file's module fixtures and the SLURM cluster stay in one worker) and its share of
# the cores' threads (tests/conftest.py). TEST_WORKERS=0 runs everything in this one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
