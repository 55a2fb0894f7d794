#!/usr/bin/env bash
# Create .venv (if missing) and install testbed with its dependencies.
# On a machine without CUDA this installs the CPU build of torch first, so nothing pulls a
# multi-GB CUDA build; where torch is already importable (a GPU cluster), it is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${TESTBED_TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[test]"
python -c "import testbed, torch; print(f'testbed {testbed.__version__} with torch {torch.__version__} in .venv')"
