"""The benchmark and GPU-check scripts run (tiny CPU versions), so a GPU session finds them working."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_smoke_runs_every_section_on_cpu(tmp_path):
    """The GPU check's CPU mode: the same sections, tiny; the resume section kills a real trainer
    process and compares the resumed run with an uninterrupted one."""
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert not [k for k, v in result.items() if "error" in v]
    assert result["correctness"]["ok"] and result["correctness"]["abs_gap"] < 0.01
    tp = result["throughput_100k"]
    assert tp["tokens_per_s"] > 0 and tp["micro_batch"] == 4 and tp["ratio_to_transformers"] > 0
    assert tp["checkpoint"]["saves_timed"] == 2 and tp["checkpoint"]["load_s"] > 0
    assert result["baseline_100k"]["tokens_per_s"] > 0
    assert result["resume"]["bit_identical"] and result["resume"]["killed_after_step"] >= 40
    assert result["resume"]["compared_values"] == 15
    assert "resume" in (out / "gpu_check.log").read_text()


def test_setup_keeps_a_site_torch_and_needs_no_network(tmp_path):
    """setup.sh on an interpreter that already has torch (here: this test's environment, which is
    a virtual environment, the harder case) builds a venv that uses that torch, with no index."""
    venv = tmp_path / "venv"
    env = dict(os.environ, PYTHON=sys.executable, VENV=str(venv), PIP_NO_INDEX="1")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import torch

    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch, testbed; print(torch.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.strip() == torch.__file__
    help_text = subprocess.run([str(venv / "bin" / "testbed"), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert help_text.returncode == 0 and "sweep" in help_text.stdout


def test_bench_train_writes_its_interface_fields(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--d-model", "32",
                           "--n-layers", "1", "--n-heads", "2", "--seq-len", "32", "--batch", "4",
                           "--steps", "3", "--rounds", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("testbed_tokens_per_s", "baseline_tokens_per_s", "ratio", "mfu", "peak_flops"):
        assert result[key] > 0
    assert result["ratio"] == result["testbed_tokens_per_s"] / result["baseline_tokens_per_s"] or \
        abs(result["ratio"] - sorted(result["ratios"])[len(result["ratios"]) // 2]) < 1e-12


def test_requirements_are_read_alike_with_and_without_a_toml_reader():
    """Python 3.10 has no tomllib: the fallback must list the same requirements and nothing else
    (the pytest markers are quoted lines too)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import missing_requirements

    pyproject = ROOT / "pyproject.toml"
    with_toml = missing_requirements.requirements(pyproject)
    reader, missing_requirements.tomllib = missing_requirements.tomllib, None
    try:
        without = missing_requirements.requirements(pyproject)
    finally:
        missing_requirements.tomllib = reader
    assert without == with_toml and "pytest>=8" in without and not any(":" in r for r in without)
