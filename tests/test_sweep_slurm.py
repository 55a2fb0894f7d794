"""SLURM executor: profiles, generated scripts, and real job arrays on a local cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from slurm_jobs import read_jsonl, release, squeue_state, wait_for

from testbed.cli import main
from testbed.errors import ConfigError
from testbed.sweep import slurm
from testbed.sweep.registry import Registry
from testbed.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
LOCAL_PROFILE = REPO / "slurm" / "profiles" / "local.yaml"
NASTY = "a b'c\"$(touch PWNED)`touch PWNED2`"  # spaces, both quotes, command substitutions
TINY = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
    "data": {"seq_len": 32, "val_sequences": 8},
    "train": {"steps": 20, "global_batch_tokens": 256, "eval_every": 10, "log_every": 5},
    "checkpoint": {"log_spaced": 3},
    "logging": {"wandb": False, "progress": False},
}


def profile(**fields):
    return {**slurm.DEFAULTS, "partition": "debug", "time": "00:10:00", "cpus_per_task": 1,
            "mem": "500M", **fields}


def test_profile_missing_a_required_field_is_named(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"partition": "gpu", "time": "01:00:00", "mem": "8G"}))
    with pytest.raises(ConfigError, match="missing the required field 'cpus_per_task'"):
        slurm.load_profile(path)
    path.write_text(yaml.safe_dump({"partition": "gpu; rm -rf /", "time": "1:00:00",
                                    "mem": "8G", "cpus_per_task": 2}))
    with pytest.raises(ConfigError, match="partition"):
        slurm.load_profile(path)
    path.write_text(yaml.safe_dump({"partition": "gpu", "time": "1:00:00", "mem": "8G",
                                    "cpus_per_task": 2, "gpu_per_task": 1}))
    with pytest.raises(ConfigError, match="did you mean 'gpus_per_task'"):
        slurm.load_profile(path)
    assert slurm.load_profile(LOCAL_PROFILE)["partition"] == "debug"
    example = slurm.load_profile(REPO / "slurm" / "profiles" / "gpu-cluster.example.yaml")
    assert example["gpus_per_task"] == 1


def test_generated_script_quotes_every_value(tmp_path):
    sweep_dir = tmp_path / NASTY
    runs = [["run-1", "run'2"], ["run $(x)"]]
    script = slurm.render_script("my sweep", sweep_dir, runs, profile(max_concurrent=3))
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    for line in ("#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --array=0-1%3",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --job-name=my_sweep"):
        assert line in script
    # Run the script's head (up to the run table) and print what bash made of the values.
    head = script.split("\n# An array task's own id")[0]
    probe = head + '\nprintf "%s\\n" "$SWEEP_DIR" "${RUNS[@]}"\n'
    for task, expected in enumerate(runs):
        out = subprocess.run(["bash", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "SLURM_ARRAY_TASK_ID": str(task)})
        assert out.stdout.splitlines() == [str(sweep_dir), *expected]
    assert not list(tmp_path.glob("PWNED*"))


def test_multinode_script_uses_srun_and_torchrun(tmp_path):
    script = slurm.render_script("big", tmp_path, [["r1"]], profile(nodes=2, gpus_per_task=8))
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    for text in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "srun ",
                 "-m torch.distributed.run", '--nnodes "$SLURM_NNODES"', "--nproc_per_node 8",
                 "--rdzv_backend c10d", '--rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"',
                 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1', "-m testbed train"):
        assert text in script


def write_sweep(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump({"name": "tiny", "base": TINY, **fields}))
    return path




def test_array_sweep_runs_every_run(slurm_cluster, tmp_path, capsys):
    sweep_dir = tmp_path / NASTY
    sweep = write_sweep(tmp_path / "s.yaml", grid={"model.d_model": [16, 32],
                                                   "train.seed": [0, 1]})
    argv = ["sweep", "run", str(sweep), "--sweep-dir", str(sweep_dir), "--executor", "slurm",
            "--profile", str(LOCAL_PROFILE), "--pack", "2", "--wait"]
    assert main(argv) == 0, capsys.readouterr()
    registry = Registry(sweep_dir)
    records = registry.records()
    assert len(records) == 4
    assert len({r["array_job"] for r in records}) == 1  # one array ...
    assert len({r["job_id"] for r in records}) == 2  # ... of two tasks, two runs each
    for record in records:
        run_dir = registry.run_dir(record["run_id"])
        assert record["state"] == "done", record
        assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == 20
        kinds = {c["kind"] for c in read_jsonl(run_dir / "checkpoints" / "index.jsonl")}
        assert {"science", "final"} <= kinds
    assert not list(tmp_path.rglob("PWNED*"))
    # Resubmitting the finished sweep queues nothing.
    capsys.readouterr()
    assert main(argv[:-1]) == 0
    assert "submitted 0 of 4 runs" in capsys.readouterr().out








def test_requeued_run_resumes_and_matches_an_uninterrupted_run(slurm_cluster, tmp_path):
    config = {**TINY, "train": {**TINY["train"], "steps": 400, "eval_every": 100},
              "checkpoint": {"log_spaced": 0, "rolling_every": 10}}
    sweep = load_sweep({"name": "preempt", "base": config})
    registry = Registry(tmp_path / "sweep")
    (run_id,) = registry.add_runs(sweep)
    profile_ = slurm.load_profile(LOCAL_PROFILE)

    # The reference: the same config trained in one go, outside SLURM, same thread count.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.Popen([sys.executable, "-m", "testbed", "train",
                                  str(registry.config_path(run_id)), "--run-dir",
                                  str(tmp_path / "reference")], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    assert slurm.submit(registry, "preempt", [run_id], profile_) == [run_id]
    job = registry.read(run_id)["job_id"]
    index = registry.run_dir(run_id) / "checkpoints" / "index.jsonl"
    wait_for(lambda: index.exists() and any(c["kind"] == "rolling" for c in read_jsonl(index)),
             240, "a rolling checkpoint")
    # Preemption: SLURM requeues the task (SIGTERM to the job; the trainer saves and exits 75).
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for(lambda: squeue_state(job) == "PENDING", 120, "the requeued task to be pending")
    release(job)
    # Time limit near: SIGUSR1 to the batch shell only (what --signal=B:USR1@N sends); the
    # script has the trainer save, then requeues the task itself.
    first_stop = max(c["step"] for c in read_jsonl(index))
    wait_for(lambda: registry.read(run_id).get("restart_count") == 1
             and max(c["step"] for c in read_jsonl(index)) >= first_stop + 20,
             240, "the resumed run to save another checkpoint")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    wait_for(lambda: squeue_state(job) == "PENDING", 120, "the self-requeued task to be pending")
    release(job)
    counts = slurm.wait(registry, "preempt", [run_id], profile_, poll_seconds=2)
    assert counts == {"done": 1}

    record = registry.read(run_id)
    assert record["preemptions"] == 2 and record["restart_count"] == 2
    assert record["job_id"] == job  # resumed by SLURM's requeue, not resubmitted
    states = [h["state"] for h in record["history"]]
    assert "preempted" in states and states[-1] == "done"
    run_dir = registry.run_dir(run_id)
    assert "resum" in (run_dir / "train.log").read_text().lower()

    output = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, output
    resumed = read_jsonl(run_dir / "metrics.jsonl")
    straight = read_jsonl(tmp_path / "reference" / "metrics.jsonl")
    final = lambda rows, key: [r[key] for r in rows if key in r][-1]  # noqa: E731
    assert final(resumed, "step") == final(straight, "step") == 400
    assert final(resumed, "val_loss") == pytest.approx(final(straight, "val_loss"), rel=1e-6)
    assert final(resumed, "train_loss") == pytest.approx(final(straight, "train_loss"), rel=1e-6)
