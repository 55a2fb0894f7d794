"""No run is trained twice: one live owner per run directory (RUN_DIR/lock), trainers that die
with their executor, reruns that leave a held run to its holder, and an honest `sweep status`."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from testbed import exits
from testbed.cli import main
from testbed.errors import TestbedError
from testbed.rundir import RunDir, RunDirBusy
from testbed.sweep.local import LocalExecutor
from testbed.sweep.outcome import record_exit
from testbed.sweep.registry import Registry
from testbed.sweep.slurm import DEFAULTS, render_script
from testbed.sweep.spec import load_sweep
from testbed.sweep.status import collect, render_status

TINY = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
    "data": {"seq_len": 32, "val_sequences": 8},
    "train": {"steps": 12, "global_batch_tokens": 256, "eval_every": 6, "log_every": 3},
    "checkpoint": {"log_spaced": 3},
    "logging": {"wandb": False, "progress": False},
}
# Long enough to be stopped in the middle (about 10 ms a step on one thread), saving a resume
# checkpoint every 50 steps.
LONG = {**TINY, "train": {"steps": 400, "global_batch_tokens": 256, "eval_every": 300,
                          "log_every": 10},
        "checkpoint": {"log_spaced": 3, "rolling_every": 50}}

# Holds a run directory's lock until killed, as a trainer would.
HOLDER = ("import sys, time; from testbed.rundir import RunDir; RunDir(sys.argv[1]).acquire(); "
          "print('held', flush=True); time.sleep(600)")

FAKE_TRAINER = """
import json, os, sys
run_dir = sys.argv[3]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(os.path.basename(run_dir) + "\\n")
with open(os.path.join(run_dir, "status.json"), "w") as f:
    json.dump({"state": "done", "step": 1}, f)
"""


def env1() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def hold(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    proc.stdout and proc.stdout.close()


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited {proc.returncode} while waiting for {what}")
        time.sleep(0.05)


def train_lines(run_dir: Path) -> list[int]:
    return [row["step"] for row in RunDir(run_dir).metrics() if "train_loss" in row]


def assert_one_writer(run_dir: Path, steps: int, log_every: int) -> None:
    """Every train line exactly once and in order, every index line once: no second writer."""
    assert train_lines(run_dir) == list(range(log_every, steps + 1, log_every))
    index = [(row["step"], row["kind"]) for row in RunDir(run_dir).index()]
    assert len(index) == len(set(index)), index
    assert RunDir(run_dir).read_status()["state"] == "done"


def started(run_dir: Path) -> bool:
    return bool(RunDir(run_dir).metrics_path.exists() and train_lines(run_dir))


# ----------------------------------------------------------------------------- the lock itself


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.lock_holder() is None and not run.lock_path.exists()  # a look creates nothing
    holder = hold(run.path)
    try:
        assert run.lock_holder() == {"host": socket.gethostname(), "pid": holder.pid,
                                     "since": run.lock_holder()["since"]}
        with pytest.raises(RunDirBusy, match=rf"pid {holder.pid} on host") as err:
            run.acquire(patience_s=0.2)
        assert err.value.exit_code == exits.BUSY and err.value.holder["pid"] == holder.pid
    finally:
        kill(holder)  # SIGKILL: no chance to clean up, and the kernel drops the lock
    assert run.lock_holder() is None
    with run.acquire() as lock:
        assert run.lock_holder()["pid"] == os.getpid()
        assert lock.fd is not None
    assert run.lock_holder() is None


@pytest.mark.slow
def test_a_second_trainer_on_a_run_dir_exits_busy_and_the_first_finishes(tmp_path, capsys):
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(LONG))
    run_dir = tmp_path / "run"
    import testbed.train.trainer  # noqa: F401  (imported now: the second trainer starts at once)

    first = subprocess.Popen([sys.executable, "-m", "testbed", "train", str(config), "--run-dir",
                              str(run_dir)], env=env1(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: started(run_dir), 60, "the first trainer's first step", first)
        code = main(["train", str(config), "--run-dir", str(run_dir)])
        err = capsys.readouterr().err
        assert code == exits.BUSY, err
        assert f"pid {first.pid} on host {socket.gethostname()}" in err
        assert err.count("error:") == 1 and "Traceback" not in err
        out, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, out
    assert_one_writer(run_dir, 400, 10)
    assert RunDir(run_dir).lock_holder() is None


@pytest.mark.slow
def test_a_sigkilled_trainer_leaves_no_lock_and_the_next_one_resumes(tmp_path):
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(LONG))
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "testbed", "train", str(config), "--run-dir",
                              str(run_dir)], env=env1(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: max(train_lines(run_dir) or [0]) >= 60, 60, "a resume checkpoint", first)
        assert (RunDir(run_dir).lock_holder() or {}).get("pid") == first.pid
    finally:
        first.kill()
        first.wait()
    assert RunDir(run_dir).lock_holder() is None
    second = subprocess.run([sys.executable, "-m", "testbed", "train", str(config), "--run-dir",
                             str(run_dir)], env=env1(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr  # takes the lock and resumes
    assert "resume from" in RunDir(run_dir).log_path.read_text()
    assert_one_writer(run_dir, 400, 10)


# ----------------------------------------------------------------------------- the registry


def seed_sweep(seeds):
    return load_sweep({"name": "fake", "base": TINY, "grid": {"train.seed": list(seeds)}})


def test_a_held_run_is_running_and_never_started_beside_its_holder(tmp_path, monkeypatch):
    log = tmp_path / "starts.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    script = tmp_path / "fake.py"
    script.write_text(FAKE_TRAINER)
    registry = Registry(tmp_path / "sweep")
    ids = registry.add_runs(seed_sweep([0, 1]))
    # Left by a dead executor (SIGKILL) while its trainer goes on holding the run directory.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with registry.locked():
        record = registry.read(ids[0])
        registry.set_state(record, "running", None, executor="local",
                           owner={"host": socket.gethostname(), "pid": dead.pid})
        registry.write(record)
    holder = hold(registry.run_dir(ids[0]))
    try:
        report = collect(registry)
        held = next(r for r in report["runs"] if r["run_id"] == ids[0])
        assert held["state"] == "running", held  # not "preempted" while it trains
        assert f"pid {holder.pid}" in held["reason"]
        # A rerun trains the other run and waits for the held one instead of starting it.
        executor = LocalExecutor(registry, ids, progress=False,
                                 trainer=[sys.executable, str(script)])
        import threading

        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(executor.run()), daemon=True)
        thread.start()
        wait_for(lambda: log.exists() and ids[1] in log.read_text(), 30, "the free run")
        time.sleep(1.0)
        assert thread.is_alive() and log.read_text().split() == [ids[1]]
        assert registry.read(ids[0])["state"] == "running"
        # A trainer turned away by the lock (exit BUSY, or 1 through torchrun) is no failure.
        for code in (exits.BUSY, exits.FAILURE):
            record = record_exit(registry, ids[0], code)
            assert record["state"] == "running" and not record.get("failures")
            assert record["last_exit_code"] == exits.BUSY
    finally:
        kill(holder)
    # Once the holder is gone (it stopped unfinished), the waiting rerun takes the run up.
    thread.join(timeout=30)
    assert not thread.is_alive() and result == {"done": 2}
    assert sorted(log.read_text().split()) == sorted(ids)


def test_a_damaged_record_is_shown_and_a_stopped_sweep_has_no_eta(tmp_path, capsys):
    registry = Registry(tmp_path / "sweep")
    ids = registry.add_runs(seed_sweep([0, 1, 2]))
    # One run half done, then stopped: nothing runs, so no ETA.
    RunDir(registry.run_dir(ids[0])).append_metrics({"step": 6, "train_loss": 3.0})
    with registry.locked():
        record = registry.read(ids[0])
        registry.set_state(record, "preempted", "stopped", started_at="2020-01-01T00:00:00")
        registry.write(record)
    report = collect(registry)
    assert 0 < report["progress"] < 1 and report["eta_seconds"] is None
    assert "nothing running" in render_status(report)

    bad = registry.record_path(ids[1])
    bad.write_text('{"run_id": "' + ids[1] + '", "sta')
    report = collect(registry)
    assert report["counts"]["damaged"] == 1 and len(report["runs"]) == 3
    row = next(r for r in report["runs"] if r["state"] == "damaged")
    assert row["run_id"] == ids[1] and str(bad) in row["reason"] and "delete" in row["reason"]
    text = render_status(report)
    assert f"DAMAGED {ids[1]}" in text and str(bad) in text
    assert main(["sweep", "status", str(registry.root)]) == 1
    assert "DAMAGED" in capsys.readouterr().out
    # Anything that would act on the records stops with one clear error instead.
    bad.write_text("[]")
    with pytest.raises(TestbedError, match=rf"{bad.name}.* holds (a JSON )?list.*delete"):
        LocalExecutor(registry, ids, progress=False).run()


def test_placeholders_in_a_sweep_directory_path_are_written_as_they_are(tmp_path):
    sweep_dir = tmp_path / "a{{setup}}b{{python}}c{{sweep_dir}}"
    profile = {**DEFAULTS, "partition": "p", "time": "01:00:00", "cpus_per_task": 1, "mem": "1G",
               "setup": ["echo set up"], "python": "/opt/py/bin/python"}
    script = render_script("s", sweep_dir, [["run-a"]], profile)
    assert f"SWEEP_DIR={shlex.quote(str(sweep_dir))}\n" in script
    assert "PYTHON=/opt/py/bin/python\necho set up\n" in script
    assert f"$outcome == {exits.BUSY} ]] && requeue=1" in script


# ----------------------------------------------------------------------------- killing `sweep run`


def long_sweep(tmp_path: Path) -> Path:
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump({"name": "long", "base": LONG}))
    return path


def sweep_run(sweep_file: Path, sweep_dir: Path, *extra: str) -> subprocess.Popen:
    # Two slots, one run: the run gets one thread, as on a two-core machine.
    return subprocess.Popen([sys.executable, "-m", "testbed", "sweep", "run", str(sweep_file),
                             "--sweep-dir", str(sweep_dir), "--workers", "2", "--no-progress",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_mid_run_then_rerun(tmp_path: Path, sig: int, *extra: str) -> tuple[Registry, str]:
    sweep_file, sweep_dir = long_sweep(tmp_path), tmp_path / "sweep"
    first = sweep_run(sweep_file, sweep_dir, *extra)
    registry = Registry(sweep_dir)
    try:
        run_id = wait_for(lambda: next((r["run_id"] for r in registry.records()
                                        if started(registry.run_dir(r["run_id"]))), None),
                          60, "the first train line", first)
        run_dir = registry.run_dir(run_id)
        first.send_signal(sig)
        first.communicate(timeout=60)
        # Its trainer does not go on alone: it saves a resume checkpoint and stops at once.
        wait_for(lambda: RunDir(run_dir).read_status().get("state") == "preempted", 15,
                 "the orphaned trainer to stop")
    finally:
        first.kill()
    lines = len(train_lines(run_dir))
    time.sleep(0.5)
    assert len(train_lines(run_dir)) == lines  # nobody writes any more
    second = sweep_run(sweep_file, sweep_dir, *extra)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert [r["state"] for r in registry.records()] == ["done"]
    assert_one_writer(run_dir, 400, 10)
    return registry, run_id


@pytest.mark.slow
@pytest.mark.parametrize("fork", [True, False], ids=["forked", "fresh"])
def test_sigkill_of_sweep_run_takes_its_trainers_along(tmp_path, fork):
    registry, run_id = stop_mid_run_then_rerun(tmp_path, signal.SIGKILL,
                                               *([] if fork else ["--no-fork-server"]))
    log = registry.log_path(run_id).read_text()
    assert ("forked by fork server" in log) == fork
    assert "resume from" in RunDir(registry.run_dir(run_id)).log_path.read_text()


@pytest.mark.slow
def test_sighup_of_sweep_run_stops_its_trainers_like_sigterm(tmp_path):
    registry, run_id = stop_mid_run_then_rerun(tmp_path, signal.SIGHUP)
    record = registry.read(run_id)
    history = [h["state"] for h in record["history"]]
    assert history[-3:] == ["preempted", "running", "done"] and record["preemptions"] == 1
