"""Lint (ruff) and type checks (mypy on the whole package) as part of the
suite, with the settings in pyproject.toml; .pre-commit-config.yaml runs the same before a commit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tool(name: str) -> list[str]:
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; run `bash scripts/setup.sh` (it installs the test extra)")
    return [found]


def test_ruff_finds_nothing():
    result = subprocess.run([*tool("ruff"), "check", "testbed", "tests", "scripts"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing():
    result = subprocess.run([*tool("mypy")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
