"""Helpers of the tests that drive SLURM jobs (tests/test_sweep_slurm.py, tests/test_multinode.py)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def squeue_state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%T"], capture_output=True,
                         text=True)
    return out.stdout.strip()


def release(job: str) -> None:
    """Start a requeued task now instead of after SLURM's hold (BeginTime).

    The hold lets the previous instance finish its cleanup; releasing within milliseconds can
    race with it (the old instance's exit is then booked to the new one), so wait a little.
    """
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)


def wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
