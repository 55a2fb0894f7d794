"""Several runs per GPU: slots and their environment, the auto rule, a packed local sweep on the
CPU (two at a time, each bit for bit as if alone), the SLURM template's packed task and its
signal forwarding, and the packing benchmark's smoke mode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from testbed.cli import main
from testbed.config import load_config
from testbed.errors import ConfigError
from testbed.sweep import local, slurm
from testbed.sweep.registry import Registry
from testbed.sweep.spec import (
    MAX_RUNS_PER_GPU,
    choose_runs_per_gpu,
    estimate_run_memory,
    load_sweep,
    sweep_runs_per_gpu,
)

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
    "data": {"seq_len": 32, "val_sequences": 8},
    "train": {"steps": 8, "global_batch_tokens": 256, "eval_every": 4, "log_every": 1},
    "checkpoint": {"log_spaced": 0},
    "logging": {"wandb": False, "progress": False},
}
GB = 10**9


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- slots


def test_k_slots_per_gpu_each_with_its_gpu_memory_share_and_threads(monkeypatch):
    monkeypatch.setattr(local, "usable_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    slots = local.worker_slots(1, ["0", "1"], runs_per_gpu=4)
    assert len(slots) == 8
    # The GPUs in turn, so that a sweep of fewer runs than slots spreads over both.
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1"] * 4
    assert {s["TESTBED_GPU_MEMORY_FRACTION"] for s in slots} == {"0.250000"}
    assert {s["OMP_NUM_THREADS"] for s in slots} == {"2"}  # 16 cores over 8 slots
    assert 3 * float(local.memory_fraction(3)) <= 1.0
    # One run per GPU: exactly the slots as before, no memory cap.
    assert local.worker_slots(1, ["0", "1"]) == [{"CUDA_VISIBLE_DEVICES": "0"},
                                                 {"CUDA_VISIBLE_DEVICES": "1"}]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the caller's cap holds for packed slots too
    assert {s["OMP_NUM_THREADS"] for s in local.worker_slots(1, ["0"], 2)} == {"1"}
    # CPU slots ignore runs_per_gpu.
    assert local.worker_slots(2, None, runs_per_gpu=4) == [
        {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}] * 2


def test_the_trainer_applies_its_memory_share_on_cuda_only(monkeypatch):
    import torch

    from testbed.train import device as dev

    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: calls.append((fraction, device)))
    monkeypatch.setenv("TESTBED_GPU_MEMORY_FRACTION", "0.250000")
    assert dev.resolve_device("cpu").type == "cpu" and calls == []
    dev.share_gpu_memory(torch.device("cuda", 0))
    assert calls == [(0.25, torch.device("cuda", 0))]
    monkeypatch.delenv("TESTBED_GPU_MEMORY_FRACTION")
    dev.share_gpu_memory(torch.device("cuda", 0))
    assert len(calls) == 1


# ----------------------------------------------------------------------------- the auto rule


def preset(name: str, *more: str):
    return load_config(None, [f"model.preset={name}", "train.steps=10", *more])


def test_auto_chooses_k_from_the_largest_runs_memory_estimate():
    small, big = preset("1m"), preset("300m")
    e_small, e_big = estimate_run_memory(small), estimate_run_memory(big)
    assert e_small is not None and e_big is not None and e_small < e_big
    # A GPU of about 2.5 of the largest run's estimate takes two of them (90% usable).
    assert choose_runs_per_gpu("auto", [small, big], int(2.5 * e_big)) == 2
    assert choose_runs_per_gpu("auto", [small], int(2.5 * e_small)) == 2
    # Capped, however small the runs.
    assert choose_runs_per_gpu("auto", [small], 141 * GB) == MAX_RUNS_PER_GPU
    assert choose_runs_per_gpu("auto", [small], 141 * GB, cap=3) == 3
    # A run above the share that two would need runs alone.
    assert choose_runs_per_gpu("auto", [small, big], int(1.5 * e_big)) == 1
    assert choose_runs_per_gpu("auto", [preset("1b")], 80 * GB) == 1
    # No GPU memory known, or no estimate possible: one run per GPU.
    assert choose_runs_per_gpu("auto", [small], None) == 1
    fsdp = preset("1m", "train.parallel=fsdp")
    assert estimate_run_memory(fsdp) is None
    assert choose_runs_per_gpu("auto", [small, fsdp], 141 * GB) == 1
    # An explicit number wins.
    assert choose_runs_per_gpu(3, [preset("1b")], 80 * GB) == 3
    assert choose_runs_per_gpu(2, [small], None) == 2
    # Activation memory grows with the micro-batch; checkpointing shrinks it.
    assert estimate_run_memory(preset("10m", "train.micro_batch_size=8")) < \
        estimate_run_memory(preset("10m"))
    assert estimate_run_memory(preset("10m", "train.activation_checkpointing=true")) < \
        estimate_run_memory(preset("10m"))


def test_the_setting_in_a_sweep_file_a_profile_and_on_the_command_line(tmp_path):
    sweep = load_sweep({"name": "s", "base": TINY, "runs_per_gpu": 3})
    assert sweep.runs_per_gpu == 3
    assert sweep_runs_per_gpu(sweep, None) == 3
    assert sweep_runs_per_gpu(sweep, None, override=2) == 2
    auto = load_sweep({"name": "s", "base": TINY})
    assert auto.runs_per_gpu == "auto"
    assert sweep_runs_per_gpu(auto, None) == 1
    assert sweep_runs_per_gpu(auto, 80 * GB) == MAX_RUNS_PER_GPU
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(ConfigError, match="runs_per_gpu"):
            load_sweep({"name": "s", "base": TINY, "runs_per_gpu": bad})
    # SLURM: command line, then the sweep file, then the profile; auto against gpu_memory_gb.
    gpu = {**slurm.DEFAULTS, "partition": "gpu", "time": "1:00:00", "cpus_per_task": 8,
           "mem": "64G", "gpus_per_task": 1}
    assert slurm.packed_per_task(gpu, auto) == 1  # auto without gpu_memory_gb
    assert slurm.packed_per_task({**gpu, "gpu_memory_gb": 80}, auto) == MAX_RUNS_PER_GPU
    assert slurm.packed_per_task({**gpu, "runs_per_gpu": 2}, auto) == 2
    assert slurm.packed_per_task({**gpu, "runs_per_gpu": 2}, sweep) == 3
    assert slurm.packed_per_task({**gpu, "runs_per_gpu": 2}, sweep, "4") == 4
    assert slurm.packed_per_task({**gpu, "gpus_per_task": 0, "gpu_memory_gb": 80}, auto) == 1
    with pytest.raises(ConfigError, match="gpus_per_task: 1"):
        slurm.packed_per_task({**gpu, "gpus_per_task": 4}, sweep)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**{k: gpu[k] for k in slurm.REQUIRED}, "runs_per_gpu": "auto",
                                    "gpu_memory_gb": 80, "mps": True}))
    assert slurm.load_profile(path)["mps"] is True
    path.write_text(yaml.safe_dump({**{k: gpu[k] for k in slurm.REQUIRED}, "runs_per_gpu": 0}))
    with pytest.raises(ConfigError, match="runs_per_gpu"):
        slurm.load_profile(path)
    example = slurm.load_profile(REPO / "slurm" / "profiles" / "gpu-cluster.example.yaml")
    assert example["runs_per_gpu"] == "auto" and example["mps"] is False


# ----------------------------------------------------------------------------- a packed local sweep


def watch_running(registry: Registry, stop: threading.Event, seen: list[int]) -> None:
    """The most runs the registry showed running at once."""
    while not stop.is_set():
        try:
            running = sum(r.get("state") == "running" for r in registry.records())
        except Exception:  # a record being replaced: look again
            running = 0
        seen.append(running)
        time.sleep(0.05)


def test_two_runs_per_cpu_slot_train_at_once_and_each_as_if_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same threads for packed and lone runs
    monkeypatch.delenv("TESTBED_GPU_MEMORY_FRACTION", raising=False)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": TINY,
                                    "grid": {"train.seed": [0, 1, 2, 3]}}))
    packed = tmp_path / "packed"
    registry = Registry(packed)
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=watch_running, args=(registry, stop, seen), daemon=True)
    watcher.start()
    try:  # --gpus 0 on a machine without CUDA: two slots, CUDA_VISIBLE_DEVICES=0, training on the CPU
        assert main(["sweep", "run", str(path), "--sweep-dir", str(packed), "--gpus", "0",
                     "--runs-per-gpu", "2", "--no-progress"]) == 0
    finally:
        stop.set()
        watcher.join()
    assert max(seen) == 2  # two at a time, never more
    records = registry.records()
    assert len(records) == 4 and all(r["state"] == "done" and r["launches"] == 1 for r in records)

    alone = tmp_path / "alone"  # the same runs, one after another in one slot
    assert main(["sweep", "run", str(path), "--sweep-dir", str(alone), "--no-progress"]) == 0
    for record in records:
        run_id = record["run_id"]
        rows = read_jsonl(registry.run_dir(run_id) / "metrics.jsonl")
        reference = read_jsonl(Registry(alone).run_dir(run_id) / "metrics.jsonl")
        losses = [r["train_loss"] for r in rows if "train_loss" in r]
        assert len(losses) == 8
        assert losses == [r["train_loss"] for r in reference if "train_loss" in r]  # bit for bit
        assert [r["val_loss"] for r in rows if "val_loss" in r] == \
            [r["val_loss"] for r in reference if "val_loss" in r]
        assert json.loads((registry.run_dir(run_id) / "run.json").read_text())["device"] == "cpu"


# ----------------------------------------------------------------------------- SLURM


def profile(**fields):
    return {**slurm.DEFAULTS, "partition": "debug", "time": "00:10:00", "cpus_per_task": 4,
            "mem": "500M", **fields}


def test_array_template_runs_k_at_once_and_forwards_signals_to_each(tmp_path):
    """The rendered task script, run by bash with stand-ins for python (the hooks), the trainer
    and scontrol: three runs, two at a time; USR1 reaches both running trainers, the third is
    never started, and the task requeues itself."""
    log = tmp_path / "events.log"
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/bin/bash\n"
        "[[ $3 == begin ]] && exit 0\n"
        'echo "end $5 $6" >> "$EVENTS"; exit "$6"\n')  # end SWEEP RUN RC SELF: outcome = rc
    trainer = tmp_path / "trainer"
    trainer.write_text(
        "#!/bin/bash\n"
        'run=$(basename "$3")\n'
        'trap \'echo "$run USR1 $TESTBED_GPU_MEMORY_FRACTION" >> "$EVENTS"; exit 75\' USR1\n'
        'trap \'echo "$run TERM" >> "$EVENTS"; exit 75\' TERM\n'
        'echo "$run started" >> "$EVENTS"\n'
        "for i in $(seq 600); do sleep 0.1; done\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$EVENTS"\n')
    for script in (fake_python, trainer, bin_dir / "scontrol"):
        script.chmod(0o755)
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "logs").mkdir(parents=True)
    text = slurm.render_script("packed", sweep_dir, [["r0", "r1", "r2"]],
                               profile(python=str(fake_python)), trainer=[str(trainer)],
                               runs_per_gpu=2)
    assert "RUNS_PER_GPU=2" in text and "TESTBED_GPU_MEMORY_FRACTION=0.500000" in text
    assert "nvidia-cuda-mps-control" not in text  # MPS only when the profile asks
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "EVENTS": str(log), "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_JOB_ID": "7",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("OMP_NUM_THREADS", None)
    job = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and (not log.exists() or log.read_text().count("started") < 2):
        time.sleep(0.1)
    time.sleep(0.3)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@N sends the batch shell
    output = job.communicate(timeout=30)[0]
    events = log.read_text().splitlines()
    assert job.returncode == 0, output
    assert {"r0 started", "r1 started", "r0 USR1 0.500000", "r1 USR1 0.500000",
            "end r0 75", "end r1 75", "scontrol requeue 7_0"} <= set(events), events
    assert "r2 started" not in events  # nothing new starts after the stop signal

    mps = slurm.render_script("packed", sweep_dir, [["r0", "r1"]], profile(mps=True), runs_per_gpu=2)
    assert "nvidia-cuda-mps-control -d" in mps and "echo quit | nvidia-cuda-mps-control" in mps
    assert "nvidia-cuda-mps-control" not in slurm.render_script(
        "one", sweep_dir, [["r0"]], profile(mps=True), runs_per_gpu=1)


def test_a_packed_array_task_on_the_local_cluster(slurm_cluster, tmp_path, capsys):
    """Two runs in one array task, trained at once (CPU cluster: --runs-per-gpu packs CPU tasks)."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "packed", "base": TINY,
                                    "grid": {"train.seed": [0, 1]}}))
    sweep_dir = tmp_path / "sweep"
    registry = Registry(sweep_dir)
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=watch_running, args=(registry, stop, seen), daemon=True)
    watcher.start()
    try:
        assert main(["sweep", "run", str(path), "--sweep-dir", str(sweep_dir), "--executor",
                     "slurm", "--profile", str(REPO / "slurm" / "profiles" / "local.yaml"),
                     "--runs-per-gpu", "2", "--wait"]) == 0, capsys.readouterr()
    finally:
        stop.set()
        watcher.join()
    records = registry.records()
    assert len({r["job_id"] for r in records}) == 1  # one task ...
    assert all(r["state"] == "done" for r in records)
    assert max(seen) == 2  # ... training both at once
    for record in records:
        assert len([r for r in read_jsonl(registry.run_dir(record["run_id"]) / "metrics.jsonl")
                    if "train_loss" in r]) == 8


# ----------------------------------------------------------------------------- the benchmark


def test_packing_benchmark_smoke_mode_prints_its_table(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_packing.py"), "--smoke",
                             "--json", str(out)], capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "| model | params | mode | k | compile s |" in result.stdout
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["k"]) for r in rows] == [("eager", 1), ("eager", 2), ("graphs", 1)]
    assert all(r["wall_tok_s"] > 0 and r["steady_tok_s"] > 0 for r in rows)
    # compile time is reported apart from the steady rate: the graphs' run compiles, eager ones do not
    assert rows[2]["compile_s"] > 0 and rows[0]["compile_s"] == rows[1]["compile_s"] == 0
