"""The benchmark and GPU-check scripts run (tiny CPU versions), so a GPU session finds them working."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["correctness"]["ok"]
    assert result["throughput"][0]["tokens_per_s"] > 0


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
