"""Shared fixtures: a real one-node SLURM cluster for the sweep tests; property-based tests
draw the same examples on every CI run (a failure there is reproducible), new ones elsewhere;
each parallel test worker's share of the CPU threads."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"

# Parallel test workers (scripts/test.sh runs two) split the cores: each worker's torch, and
# every trainer it starts, gets its share of threads. OpenMP threads beyond the cores spin
# against each other's and made single runs up to six times slower.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    from testbed.sweep.local import usable_cores

    _share = max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))


def slurm_missing_reason() -> str | None:
    for tool in ("sbatch", "squeue", "scontrol", "slurmctld", "slurmd", "munged"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} not found (install with: apt-get install -y slurm-wlm munge)"
    if os.geteuid() != 0:
        return "starting the local SLURM cluster needs root (munge and slurmd)"
    return None


def multinode_missing_reason() -> str | None:
    reason = slurm_missing_reason()
    for tool in ("ip", "nsenter", "unshare"):
        if reason is None and shutil.which(tool) is None:
            reason = f"{tool} not found (install with: apt-get install -y iproute2 util-linux)"
    return reason


def cluster_answers(conf: str) -> bool:
    env = {**os.environ, "SLURM_CONF": conf}
    result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True,
                            text=True, timeout=30)
    return result.returncode == 0 and any(s in result.stdout for s in ("idle", "mixed", "alloc"))


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running one-node cluster; started here (and stopped after) if needed.

    Without SLURM the tests skip, except under CI, where a missing cluster is a failure.
    """
    reason = slurm_missing_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but no SLURM cluster can be started: {reason}")
        pytest.skip(reason)
    existing = os.environ.get("SLURM_CONF")
    if existing and Path(existing).is_file() and cluster_answers(existing):
        yield existing  # someone else's cluster: use it, leave it running
        return
    state_dir = os.environ.get("TESTBED_SLURM_STATE", "/tmp/testbed-slurm")
    conf = str(Path(state_dir) / "slurm.conf")
    already = subprocess.run(["bash", str(CLUSTER_SCRIPT), "status", state_dir],
                             capture_output=True).returncode == 0
    if not already:
        result = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", state_dir],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            pytest.fail(f"scripts/slurm_cluster.sh start failed: {result.stderr}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if not already:
            subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", state_dir], capture_output=True)


@pytest.fixture(scope="session")
def slurm_two_nodes():
    """SLURM_CONF of a two-node cluster (scripts/slurm_cluster.sh with NODES=2: each slurmd in
    its own network namespace, own address and hostname), started here and stopped after. The
    tests set SLURM_CONF to it themselves (monkeypatch), beside the one-node cluster's."""
    reason = multinode_missing_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but no two-node SLURM cluster can be started: {reason}")
        pytest.skip(reason)
    state_dir = os.environ.get("TESTBED_SLURM2_STATE", "/tmp/testbed-slurm-2nodes")
    result = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", state_dir, "2"],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(f"scripts/slurm_cluster.sh start {state_dir} 2 failed: {result.stderr}")
    try:
        yield str(Path(state_dir) / "slurm.conf")
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", state_dir], capture_output=True)
