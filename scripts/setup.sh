#!/usr/bin/env bash
# Create .venv (if missing) and install testbed with its dependencies and the test and eval extras
# (lm-eval, for `testbed eval harness`).
#
# Where $PYTHON (default python3) already imports torch (a GPU machine, a cluster's module or
# conda environment), that torch is kept: .venv sees the site's packages (system site packages,
# plus a .pth for a parent virtual or conda environment), testbed is installed without its
# dependencies and without network, and any missing dependency is then asked for once; the
# optional ones (wandb, datasets) may stay missing, and lm-eval is left to `pip install -e '.[eval]'`.
# Elsewhere the CPU build of torch is installed first, so nothing pulls a multi-GB CUDA build.
#   PYTHON=/path/to/python   the interpreter to build on     VENV=DIR   where (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ -x "$VENV/bin/python" ]; then
  :
elif "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # $PYTHON is itself a virtual or conda environment: its packages are not "system" ones.
    site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$PYTHON" -c "import site, sys; print('\n'.join(p for p in sys.path if p.endswith('-packages')))" \
      > "$site/_site_packages.pth"
  fi
  touch "$VENV/.site-torch"
else
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
if [ -e "$VENV/.site-torch" ]; then
  # No network needed: the checkout is installed as it is, then missing requirements are listed.
  if ! python -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>/dev/null; then
    # No setuptools in reach (e.g. Python 3.12 without it): point the environment at the checkout.
    site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$PWD" > "$site/_testbed_checkout.pth"
    printf '#!/bin/sh\nexec "%s" -m testbed "$@"\n' "$(cd "$VENV" && pwd)/bin/python" > "$VENV/bin/testbed"
    chmod +x "$VENV/bin/testbed"
  fi
  missing=$(python scripts/missing_requirements.py)
  if [ -n "$missing" ]; then
    python -m pip install -q $missing 2>/dev/null ||
      echo "setup: could not install $missing (no network?); wandb logging and hub datasets stay" \
           "off until they are installed" >&2
  fi
else
  python -m pip install -q --upgrade pip >/dev/null
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==${TESTBED_TORCH_VERSION:-2.13.0}"
  fi
  python -m pip install -q -e ".[test,eval]"
fi
python -c "import testbed, torch; print(f'testbed {testbed.__version__} with torch {torch.__version__} ({torch.__file__}) in $VENV')"
