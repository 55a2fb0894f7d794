"""Shared by the study tests: the built-in studies, the CLI as a subprocess, and one study's tiny run
checked end to end (split over two test files so that two test workers share the runs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_STUDIES = ["shape", "chinchilla", "ablation", "optimizers", "stability", "discrepancy", "mup-transfer"]
DATA_STUDIES = ["wsd", "repetition", "annealing", "power", "vocab", "mixture"]
STUDIES = MODEL_STUDIES + DATA_STUDIES


def cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, "-m", "testbed", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def _check_report(out: Path, name: str):
    figures = json.loads((out / "figures.json").read_text())
    assert figures["study"] == name and figures["claim"]
    assert figures["measured"]["value"] is not None
    assert figures["verdict"] == "inconclusive (tiny)"
    assert figures["runs"] > 0 and figures["runs_wall_s"] > 0
    report = (out / "report.md").read_text()
    assert figures["claim"] in report and "Verdict" in report and "Measured" in report
    return figures


def wsd_durations(size):
    from testbed.study.builtin.wsd import durations

    return durations(size)


def run_tiny(tmp_path: Path, name: str, monkeypatch) -> None:
    """`study run NAME --size tiny`, then its report, fork servers, and each study's own checks."""
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "cache"))  # vocab prepares its mini corpora here
    out = tmp_path / name
    result = cli("study", "run", name, "--size", "tiny", "--out", str(out), "--workers", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    _check_report(out, name)
    # the study keeps each slot's fork server from sweep to sweep: torch is imported once per slot
    servers = set(re.findall(r"forked by fork server (\d+)", "".join(
        p.read_text() for p in out.glob("sweep/*/logs/*.log"))))
    assert 1 <= len(servers) <= 2, servers
    if name == "annealing":  # one run per sweep: every run on slot 0's server
        assert len(servers) == 1, servers
    if name == "vocab":  # every (model, vocabulary) point, on corpora cut from one BPE training
        points = json.loads((out / "figures.json").read_text())["tables"]["points"]
        assert sorted({p["vocab"] for p in points}) == [300, 384, 512] and len(points) == 6
        merges = {v: json.loads(next((tmp_path / "cache").glob(f"studies/*nest512-bpe{v}/tokenizer.json"))
                                .read_text())["model"]["merges"] for v in (300, 512)}
        assert merges[300] == merges[512][:300 - 257]
    if name == "wsd":  # cooldown branches of the long run are part of the report
        more = json.loads((out / "figures.json").read_text())["more"]
        assert any("branch" in m["name"] for m in more)
        # beside them, the long run's weight EMA and its last-K checkpoint average (evaluated, not trained)
        assert any(m["name"].startswith("weight EMA") for m in more)
        assert any(m["name"].startswith("last-4 checkpoint average") and m["value"] is not None for m in more)
        # only real branches: the long run's own end is the longest WSD arm, a check that cannot fail
        longest = max(wsd_durations("tiny"))
        assert all(float(re.search(r"D=([0-9.e+]+)", m["name"])[1]) < longest
                   for m in more if m["name"].startswith("branch"))
        # study report re-analyses without training: no run directory changes, no run starts
        before = {p: p.stat().st_mtime_ns for p in out.rglob("status.json")}
        again = cli("study", "report", str(out))
        assert again.returncode == 0, again.stderr
        assert {p: p.stat().st_mtime_ns for p in out.rglob("status.json")} == before
        assert not list(out.rglob("registry/*.json")) or all(
            json.loads(p.read_text())["launches"] == 1 for p in out.rglob("registry/*.json"))
        # running again resumes: every run is done, so nothing is trained
        rerun = cli("study", "run", name, "--size", "tiny", "--out", str(out))
        assert rerun.returncode == 0, rerun.stderr
        assert {p: p.stat().st_mtime_ns for p in out.rglob("status.json")} == before
