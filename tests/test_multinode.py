"""Runs that span two nodes of a real SLURM cluster: srun + torchrun --nnodes 2 over gloo.

The cluster (tests/conftest.py: slurm_two_nodes) runs each slurmd in its own network namespace
with its own address and hostname, so the two ranks of a run meet only over the network, as on
a real cluster. Every run is compared with the same config trained as two processes on this
machine, outside SLURM: the losses must be equal, through a lost rank and two requeues.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from slurm_jobs import read_jsonl, release, squeue_state, wait_for

from testbed.cli import main
from testbed.sweep import slurm
from testbed.sweep.registry import Registry
from testbed.sweep.spec import load_sweep

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "slurm" / "profiles" / "local-2node.yaml"
CONFIG = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
    "data": {"seq_len": 32, "val_sequences": 8},
    "train": {"steps": 1500, "global_batch_tokens": 256, "eval_every": 500, "log_every": 5},
    "checkpoint": {"log_spaced": 0, "rolling_every": 25},
    "logging": {"wandb": False, "progress": False},
}










def trainer_pids(namespace: str) -> list[int]:
    """The trainer ranks (not the torchrun agent) running on one node of the cluster."""
    out = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    pids = []
    for pid in out.stdout.split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"testbed" in cmdline and b"train" in cmdline and b"torch.distributed.run" not in cmdline:
            pids.append(int(pid))
    return pids


def rolling_steps(run_dir: Path) -> list[int]:
    index = run_dir / "checkpoints" / "index.jsonl"
    return [c["step"] for c in read_jsonl(index) if c["kind"] == "rolling"] if index.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The config trained in one go as two processes on this machine (torchrun --standalone)."""
    folder = tmp_path_factory.mktemp("reference")
    (folder / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "testbed", "train", str(folder / "config.yaml"),
                          "--run-dir", str(folder / "run")], env=env, capture_output=True, text=True,
                         timeout=600)
    log = folder / "run" / "train.log"
    assert out.returncode == 0, (log.read_text() if log.exists() else "") + out.stderr[-3000:]
    return folder / "run"


def losses(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_jsonl(run_dir / "metrics.jsonl") if key in r]


def test_two_node_sweep_trains_like_two_local_processes(slurm_two_nodes, monkeypatch, tmp_path,
                                                        reference, capsys):
    monkeypatch.setenv("SLURM_CONF", slurm_two_nodes)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "two-node", "base": CONFIG}))
    sweep_dir = tmp_path / "sweep dir"
    argv = ["sweep", "run", str(sweep), "--sweep-dir", str(sweep_dir), "--executor", "slurm",
            "--profile", str(PROFILE), "--wait"]
    assert main(argv) == 0, capsys.readouterr()
    registry = Registry(sweep_dir)
    (record,) = registry.records()
    assert record["state"] == "done", record
    run_dir = registry.run_dir(record["run_id"])
    run = json.loads((run_dir / "run.json").read_text())
    assert run["world_size"] == 2
    assert run["hosts"] == ["node1", "node2"]  # one rank on each node, named by its node
    script = Path(record["script"]).read_text()
    assert "#SBATCH --nodes=2" in script and "srun " in script and '--nnodes "$SLURM_NNODES"' in script
    for key in ("train_loss", "val_loss"):
        assert losses(run_dir, key) == losses(reference, key)  # bit for bit: same sums, same order


def test_lost_rank_and_requeues_resume_to_the_same_losses(slurm_two_nodes, monkeypatch, tmp_path,
                                                          reference):
    monkeypatch.setenv("SLURM_CONF", slurm_two_nodes)
    registry = Registry(tmp_path / "sweep")
    (run_id,) = registry.add_runs(load_sweep({"name": "faults", "base": CONFIG}))
    profile = slurm.load_profile(PROFILE)
    assert slurm.submit(registry, "faults", [run_id], profile) == [run_id]
    job = registry.read(run_id)["job_id"]
    run_dir = registry.run_dir(run_id)

    # 1. A rank dies on the second node (SIGKILL: the out-of-memory killer, a crashed process).
    # Rank 0 loses its peer at the next collective and says so; the job requeues itself.
    wait_for(lambda: rolling_steps(run_dir) and trainer_pids("tbns2"), 180, "a rolling checkpoint")
    (victim,) = trainer_pids("tbns2")
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: squeue_state(job) == "PENDING", 120, "the job to requeue itself")
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["lost_peer"], status
    assert "lost a peer process" in status["message"]
    record = registry.read(run_id)
    assert record["lost"] == 1 and record["state"] == "preempted", record
    release(job)

    # 2. `scontrol requeue` (preemption): TERM to every process of the job on both nodes.
    def saved_after(step: int) -> bool:
        return registry.read(run_id).get("restart_count") == restarts and max(rolling_steps(run_dir)) >= step

    restarts, stop = 1, max(rolling_steps(run_dir))
    wait_for(lambda: saved_after(stop + 50), 180, "the resumed run to save again")
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for(lambda: squeue_state(job) == "PENDING", 120, "the requeued job to be pending")
    release(job)

    # 3. The time limit near: USR1 to the batch shell only; the ranks save and the job requeues.
    restarts, stop = 2, max(rolling_steps(run_dir))
    wait_for(lambda: saved_after(stop + 50), 180, "the resumed run to save again")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    wait_for(lambda: squeue_state(job) == "PENDING", 120, "the self-requeued job to be pending")
    release(job)
    assert slurm.wait(registry, "faults", [run_id], profile, poll_seconds=1) == {"done": 1}

    record = registry.read(run_id)
    assert len(registry.records()) == 1 and record["job_id"] == job  # requeued, never resubmitted
    assert record["launches"] == 4 and record["restart_count"] == 3
    assert record["lost"] == 1 and record["preemptions"] == 2 and record.get("failures", 0) == 0
    states = [h["state"] for h in record["history"]]
    assert states.count("preempted") == 3 and states[-1] == "done"
    log = (run_dir / "train.log").read_text()
    assert log.count("resume from") == 3 and log.count("resume checkpoint saved") == 2
    # Each step trained and logged once, and every figure as in the uninterrupted run.
    train = losses(run_dir, "train_loss")
    assert [s for s, _ in train] == list(range(5, 1501, 5))
    # Bit for bit, the logged means of training-loss windows that a stop split included: each
    # rank continues its own share of the window (saved per rank in the checkpoint).
    for key in ("train_loss", "val_loss"):
        assert losses(run_dir, key) == losses(reference, key)
