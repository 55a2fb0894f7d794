"""The registry and the local executor: retries, preemption, concurrency, status, real runs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest
import yaml

from testbed.cli import main
from testbed.sweep.local import LocalExecutor
from testbed.sweep.registry import Registry
from testbed.sweep.spec import load_sweep
from testbed.sweep.status import collect

TINY = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
    "data": {"seq_len": 32, "val_sequences": 8},
    "train": {"steps": 12, "global_batch_tokens": 256, "eval_every": 6, "log_every": 3},
    "checkpoint": {"log_spaced": 3},
    "logging": {"wandb": False, "progress": False},
}

# Stands in for the trainer where the test is about the executor, not about training: exits
# with the codes FAKE_PLAN lists for the run's seed, one per attempt, writing status.json the
# way the trainer does, and logs every start to FAKE_LOG.
FAKE_TRAINER = textwrap.dedent("""
    import json, os, sys, time
    import yaml
    config_path, run_dir = sys.argv[1], sys.argv[3]
    seed = str(yaml.safe_load(open(config_path))["train"]["seed"])
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(os.path.basename(run_dir) + "\\n")
    attempt = [l.strip() for l in open(os.environ["FAKE_LOG"])].count(os.path.basename(run_dir))
    codes = json.load(open(os.environ["FAKE_PLAN"])).get(seed, [0])
    code = codes[min(attempt, len(codes)) - 1]
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    state = {0: "done", 75: "preempted"}.get(code, "failed")
    with open(os.path.join(run_dir, "status.json"), "w") as f:
        json.dump({"state": state, "step": attempt}, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": attempt, "train_loss": 2.5}) + "\\n")
    print("fake trainer: attempt", attempt, "exit", code)
    sys.exit(code)
""")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    log = tmp_path / "starts.log"
    plan = tmp_path / "plan.json"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_PLAN", str(plan))

    def setup(codes_by_seed: dict[int, list[int]]):
        plan.write_text(json.dumps({str(k): v for k, v in codes_by_seed.items()}))
        return [sys.executable, str(script)]

    setup.starts = lambda: log.read_text().split() if log.exists() else []
    return setup


def seed_sweep(seeds):
    return load_sweep({"name": "fake", "base": TINY, "grid": {"train.seed": list(seeds)}})


def test_retries_preemption_and_bad_input(tmp_path, fake):
    trainer = fake({0: [0], 1: [1, 1, 1, 1, 1], 2: [75, 0], 3: [2]})
    registry = Registry(tmp_path / "sweep")
    ids = registry.add_runs(seed_sweep(range(4)))
    counts = LocalExecutor(registry, ids, max_retries=2, progress=False, trainer=trainer).run()
    assert counts == {"done": 2, "failed": 2}
    starts = fake.starts()
    assert [starts.count(i) for i in ids] == [1, 3, 2, 1]  # 1 + max_retries; bad input once
    records = {r["run_id"]: r for r in registry.records()}
    assert records[ids[1]]["failures"] == 3 and "status 1" in records[ids[1]]["reason"]
    assert records[ids[2]]["preemptions"] == 1 and records[ids[2]]["state"] == "done"
    assert records[ids[3]]["retryable"] is False and "bad input" in records[ids[3]]["reason"]

    report = collect(registry)
    assert report["counts"]["done"] == 2 and report["counts"]["failed"] == 2
    failed = [r for r in report["runs"] if r["state"] == "failed"]
    assert any("fake trainer: attempt 3 exit 1" in line for line in failed[0]["log_tail"])

    # Submitting again starts nothing: done runs are skipped, failures are out of retries.
    LocalExecutor(registry, ids, max_retries=2, progress=False, trainer=trainer).run()
    assert fake.starts() == starts
    # A higher retry limit gives the failing run one more go, never the bad-input one.
    LocalExecutor(registry, ids, max_retries=3, progress=False, trainer=trainer).run()
    assert fake.starts()[len(starts):] == [ids[1]]


def test_slot_threads_share_the_granted_cores_within_the_callers_cap(monkeypatch):
    """Inside a SLURM allocation or a cpuset the usable cores are the affinity mask, not the
    node's count; an OMP_NUM_THREADS given to the executor caps each slot (oversubscribed
    OpenMP threads spin and slow every run)."""
    import os

    from testbed.sweep.local import worker_slots

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [s["OMP_NUM_THREADS"] for s in worker_slots(2, None)] == ["2", "2"]
    assert [s["OMP_NUM_THREADS"] for s in worker_slots(8, None)] == ["1"] * 8
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert [s["OMP_NUM_THREADS"] for s in worker_slots(1, None)] == ["1"]
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # a cap above the share changes nothing
    assert [s["OMP_NUM_THREADS"] for s in worker_slots(1, None)] == ["4"]
    assert worker_slots(1, ["0", "1"]) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]


def test_no_more_slots_than_unfinished_runs(tmp_path, fake, monkeypatch):
    """A sweep of one run on two workers runs on slot 0 only, so a study's later one-run sweeps
    reuse slot 0's warm fork server instead of a racing slot starting a second one; two runs use
    both slots, and a sweep with everything done still looks once."""
    trainer = fake({})
    started: list[int] = []
    slot_loop = LocalExecutor._slot_loop

    def recording(self, slot, env):
        started.append(slot)
        return slot_loop(self, slot, env)

    monkeypatch.setattr(LocalExecutor, "_slot_loop", recording)
    registry = Registry(tmp_path / "one")
    ids = registry.add_runs(seed_sweep([0]))
    assert LocalExecutor(registry, ids, workers=2, progress=False, trainer=trainer).run() == {"done": 1}
    assert started == [0]
    started.clear()
    assert LocalExecutor(registry, ids, workers=2, progress=False, trainer=trainer).run() == {"done": 1}
    assert started == [0] and fake.starts() == [ids[0]]
    started.clear()
    registry = Registry(tmp_path / "two")
    ids = registry.add_runs(seed_sweep([0, 1]))
    assert LocalExecutor(registry, ids, workers=2, progress=False, trainer=trainer).run() == {"done": 2}
    assert sorted(started) == [0, 1]


def test_two_concurrent_submitters_never_run_a_run_twice(tmp_path, fake, monkeypatch):
    trainer = fake({})
    monkeypatch.setenv("FAKE_SLEEP", "0.4")
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "fake", "base": TINY,
                                          "grid": {"train.seed": list(range(6))}}))
    runner = textwrap.dedent(f"""
        import sys
        from testbed.sweep.local import LocalExecutor
        from testbed.sweep.registry import Registry
        from testbed.sweep.spec import load_sweep
        registry = Registry(sys.argv[1])
        ids = registry.add_runs(load_sweep(sys.argv[2]))
        print(LocalExecutor(registry, ids, progress=False, trainer={trainer!r}).run())
    """)
    procs = [subprocess.Popen([sys.executable, "-c", runner, str(tmp_path / "sweep"),
                               str(sweep_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    starts = fake.starts()
    assert len(starts) == 6 and len(set(starts)) == 6  # every run exactly once
    assert all(r["state"] == "done" for r in Registry(tmp_path / "sweep").records())


def test_a_run_left_by_a_dead_executor_is_resumed(tmp_path, fake):
    trainer = fake({})
    registry = Registry(tmp_path / "sweep")
    ids = registry.add_runs(seed_sweep([0]))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with registry.locked():
        record = registry.read(ids[0])
        registry.set_state(record, "running", None, executor="local",
                           owner={"host": socket.gethostname(), "pid": dead.pid})
        registry.write(record)
    assert LocalExecutor(registry, ids, progress=False, trainer=trainer).run() == {"done": 1}
    history = [h["state"] for h in registry.read(ids[0])["history"]]
    assert history[-3:] == ["preempted", "running", "done"]


def test_bad_sweep_is_refused_before_anything_is_written(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "base": TINY,
                                    "grid": {"optim.lrr": [1e-3, 2e-3]}}))
    assert main(["sweep", "run", str(path), "--sweep-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'optim.lr'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_real_runs_through_the_cli_and_resubmission_skips_them(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": TINY,
                                    "grid": {"model.d_model": [16, 32]}}))
    out = tmp_path / "sweep"
    argv = ["sweep", "run", str(path), "--sweep-dir", str(out), "--workers", "2", "--no-progress"]
    assert main(argv) == 0
    registry = Registry(out)
    for record in registry.records():
        run_dir = registry.run_dir(record["run_id"])
        assert record["state"] == "done" and record["launches"] == 1
        assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
        lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert lines[-1]["step"] == 12 and any("val_loss" in l for l in lines)
        kinds = [json.loads(l)["kind"] for l in
                 (run_dir / "checkpoints" / "index.jsonl").read_text().splitlines()]
        assert "science" in kinds
        run_json = json.loads((run_dir / "run.json").read_text())
        assert run_json["planned_steps"] == record["quantities"]["planned_steps"]
    assert main(argv) == 0
    assert all(r["launches"] == 1 for r in registry.records())  # nothing trained twice
    capsys.readouterr()
    assert main(["sweep", "status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counts"]["done"] == 2
    assert all(r["step"] == 12 and r["val_loss"] is not None for r in status["runs"])
