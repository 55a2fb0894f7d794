"""Checkpoints and resume, end to end: real processes killed and preempted, real files damaged.

Every run here is the same tiny model (d_model 32, 2 layers, 40 steps of 256 tokens). The
uninterrupted run is the reference; every interrupted run must end with exactly (==) its train
and validation losses. Kill points are drawn from a seeded generator, printed, and can be
redrawn with TESTBED_KILL_SEED=<int> (and TESTBED_KILLS=<n> for more kills per run).

Run with `pytest tests/test_checkpoint_resume.py -s` to see the kill/resume cycles.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from testbed import cli as testbed_cli
from testbed.config import load_config
from testbed.data import loader as data_loader
from testbed.rundir import RunDir
from testbed.train import checkpoint as ckpt
from testbed.train.trainer import train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 40
GBT = 256
KILL_SEED = int(os.environ.get("TESTBED_KILL_SEED", "20240611"))
N_KILLS = int(os.environ.get("TESTBED_KILLS", "3"))

BASE = {
    "name": "ckpt-test",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
    "data": {"source": "synthetic", "seq_len": 32, "val_sequences": 8},
    "optim": {"lr": 3.0e-3},
    "schedule": {"name": "cosine", "warmup_steps": 4},
    "train": {"steps": STEPS, "global_batch_tokens": GBT, "eval_every": 5, "log_every": 1,
              "device": "cpu"},
    "checkpoint": {"every": 10, "log_spaced": 4, "at_tokens": [4000], "rolling_every": 3,
                   "keep_rolling": 2},
    "logging": {"wandb": False, "progress": False},
}
# every 10 -> 10 20 30 40; log_spaced 4 -> 40^(0, 1/3, 2/3, 1) = 1, 3.42, 11.7, 40 -> 1 3 12 40;
# at_tokens 4000 -> ceil(4000 / 256) = 16.
SCIENCE = {1, 3, 10, 12, 16, 20, 30, 40}
ROLLING = [s for s in range(3, STEPS, 3) if s not in SCIENCE]  # 6 9 15 ... 39
CKPT_FILES = {"model.safetensors", "optim.safetensors", "state.json", "SHA256SUMS"}

# One thread everywhere: the machine is shared, and the reference (in this process) and the
# interrupted runs (child processes) must run the very same kernels to agree bit for bit.
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO),
                 PYTHONUNBUFFERED="1")


# ----------------------------------------------------------------------------- helpers


def read_jsonl(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    for raw in path.read_text().splitlines():
        try:
            out.append(json.loads(raw))
        except json.JSONDecodeError:
            pass  # a line being written right now by a live child
    return out


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["train_loss"]) for m in read_jsonl(run_dir / "metrics.jsonl") if "train_loss" in m]


def val_lines(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(m["step"], m["val_loss"], m["val_bpb"]) for m in read_jsonl(run_dir / "metrics.jsonl")
            if "val_loss" in m]


def last_train_step(run_dir: Path) -> int:
    steps = [s for s, _ in train_losses(run_dir)]
    return max(steps) if steps else 0


def log_lines(run_dir: Path) -> list[str]:
    path = run_dir / "train.log"
    return path.read_text().splitlines() if path.exists() else []


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def snapshot(run_dir: Path) -> dict[str, tuple[str, int]]:
    """Every file under run_dir with its hash and mtime: proof that nothing was touched. The
    lock is left out: whoever opens the directory, a refused trainer too, writes its holder."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        if p.name == "lock":
            continue
        if p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(run_dir))] = (digest, p.stat().st_mtime_ns)
        else:
            out[str(p.relative_to(run_dir)) + "/"] = ("dir", 0)
    return out


def checksums_hold(folder: Path) -> bool:
    """SHA256SUMS checked here with hashlib, independently of testbed's own verify()."""
    listed = dict(reversed(line.split()) for line in (folder / "SHA256SUMS").read_text().splitlines())
    return set(listed) == CKPT_FILES - {"SHA256SUMS"} and all(
        hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest for name, digest in listed.items())


def resumed_steps(run_dir: Path) -> list[int]:
    """Steps the run was resumed at, from train.log's 'resume from ... at step S/T' lines."""
    return [int(line.split(" at step ")[1].split("/")[0]) for line in log_lines(run_dir)
            if "resume from" in line]


def child(config_path: Path, run_dir: Path, *flags: str) -> subprocess.Popen:
    with open(run_dir.parent / f"{run_dir.name}.out", "ab") as out:  # the child keeps its own copy
        return subprocess.Popen([sys.executable, "-m", "testbed", "train", str(config_path), "--run-dir",
                                 str(run_dir), *flags], cwd=REPO, env=CHILD_ENV, stdout=out,
                                stderr=subprocess.STDOUT)


def wait_until(predicate, proc: subprocess.Popen, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"the child exited ({proc.returncode}) before {what}"
        time.sleep(0.002)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_training(proc: subprocess.Popen, run_dir: Path, log_before: int, step: int) -> int:
    """Block until this child has written its start line (metrics are truncated by then) and
    has completed `step` steps; return the last completed step seen."""
    wait_until(lambda: len(log_lines(run_dir)) > log_before, proc, "the start line in train.log")

    def reached():
        last = last_train_step(run_dir)
        return last if last >= step else 0

    return wait_until(reached, proc, f"step {step}")


def run_cli(*args: str) -> int:
    """`testbed ...` in this process (no process start-up cost); returns the exit status."""
    return testbed_cli.main([str(a) for a in args])


def preempt_in_process(config, run_dir: Path, at_step: int) -> dict:
    """Train until a real SIGUSR1 arrives during step `at_step` (raised by the data loader when it
    hands out that step's batch), so the stop step is deterministic."""
    original = data_loader.BatchPlan.batch_tokens

    def batch_tokens(self, step, rank=0, world=1):
        if step == at_step - 1:  # 0-based index of the step that completes as `at_step`
            signal.raise_signal(signal.SIGUSR1)
        return original(self, step, rank, world)

    data_loader.BatchPlan.batch_tokens = batch_tokens
    try:
        summary = train(config, run_dir)
    finally:
        data_loader.BatchPlan.batch_tokens = original
    assert summary["exit_code"] == 75 and summary["steps"] == at_step
    return summary


def assert_matches_reference(run_dir: Path, reference: dict, stopped_at: int | None = None):
    """Train and eval lines equal the uninterrupted run's, also for a run stopped by preemption
    after step `stopped_at`: its resume checkpoint is not validated, so it adds no eval line."""
    got = train_losses(run_dir)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), "one train line per step, in order, no repeats"
    assert got == reference["train"], "train losses differ from the uninterrupted run"
    assert val_lines(run_dir) == reference["val"], f"eval lines differ (stopped after step {stopped_at})"
    assert status(run_dir)["state"] == "done"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def config_path(root) -> Path:
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


@pytest.fixture(scope="module")
def reference(root, config_path) -> dict:
    run_dir = root / "reference"
    train(load_config(config_path), run_dir)
    out = {"dir": run_dir, "train": train_losses(run_dir), "val": val_lines(run_dir)}
    assert len(out["train"]) == STEPS and all(math.isfinite(x) for _, x in out["train"])
    return out


@pytest.fixture(scope="module")
def preempted(root, config_path, reference) -> dict[int, Path]:
    """Unfinished runs stopped by a real SIGUSR1 after step 7 and after step 8."""
    out = {}
    for at in (7, 8):
        run_dir = root / f"preempted{at}"
        preempt_in_process(load_config(config_path), run_dir, at)
        out[at] = run_dir
    return out


def fresh_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- 1. SIGKILL


@pytest.fixture(scope="module")
def killed_run(root, config_path, reference) -> dict:
    """The reference config trained in child processes that are SIGKILLed at random steps."""
    rng = random.Random(KILL_SEED)
    while True:  # kill points at least 5 steps apart, so each resumed child makes progress first
        points = sorted(rng.sample(range(2, STEPS - 5), N_KILLS))
        if all(b - a >= 5 for a, b in zip(points, points[1:])):
            break
    delays = [rng.uniform(0.0, 0.02) for _ in points]  # land anywhere in a step, checkpoint writes too
    print(f"\nSIGKILL seed {KILL_SEED}: kill once step >= {points}")
    run_dir = root / "killed"
    cycles = []
    for i, (point, delay) in enumerate(zip(points, delays)):
        flags = ("--resume",) if i % 2 else ()  # alternate: explicit --resume and automatic resume
        before = len(log_lines(run_dir))
        proc = child(config_path, run_dir, *flags)
        wait_for_training(proc, run_dir, before, point)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
        cycles.append({"kill_after": last_train_step(run_dir), "flags": flags})
    proc = child(config_path, run_dir, "--resume")
    assert proc.wait(300) == 0, (run_dir.parent / "killed.out").read_text()[-3000:]
    resumed = resumed_steps(run_dir)
    print(f"kill/resume cycles: {len(cycles)}; killed after steps {[c['kill_after'] for c in cycles]}, "
          f"resumed at steps {resumed}")
    return {"dir": run_dir, "cycles": cycles, "points": points, "resumed": resumed}


def test_sigkilled_run_resumes_to_the_exact_reference_losses(killed_run, reference):
    run_dir = killed_run["dir"]
    assert len(killed_run["cycles"]) == N_KILLS
    for cycle, point in zip(killed_run["cycles"], killed_run["points"]):
        assert point <= cycle["kill_after"] < STEPS
    # Every kill is followed by a resume (the third launch has no --resume flag: automatic) from
    # a checkpoint no newer than the last step the killed child completed.
    resumed = killed_run["resumed"]
    assert len(resumed) == N_KILLS
    for cycle, step in zip(killed_run["cycles"], resumed):
        assert 1 <= step <= cycle["kill_after"]
        assert step in SCIENCE or step in ROLLING
    assert_matches_reference(run_dir, reference)
    # The index reads like the reference's: same checkpoints, kinds, retention and val losses.
    assert ckpt.read_index(run_dir) == ckpt.read_index(reference["dir"])


# ----------------------------------------------------------------------------- 2. automatic resume


def test_unfinished_run_resumes_without_the_flag(root, config_path, preempted, reference):
    run_dir = fresh_copy(preempted[7], root / "auto-resume")
    assert status(run_dir)["state"] == "preempted"
    assert run_cli("train", config_path, "--run-dir", run_dir) == 0  # no --resume
    assert "resume from" in log_lines(run_dir)[-2] and "at step 7/40" in log_lines(run_dir)[-2]
    assert_matches_reference(run_dir, reference, stopped_at=7)


def test_unfinished_run_with_another_config_is_refused(root, config_path, preempted, capsys):
    run_dir = fresh_copy(preempted[7], root / "other-config")
    before = snapshot(run_dir)
    assert run_cli("train", config_path, "--run-dir", run_dir, "optim.lr=1e-3") == 2
    err = capsys.readouterr().err
    assert "different config" in err and "optim.lr" in err
    assert snapshot(run_dir) == before


def test_finished_run_is_refused_untouched_then_overwritten(root, config_path, killed_run, reference, capsys):
    run_dir = fresh_copy(killed_run["dir"], root / "finished")
    before = snapshot(run_dir)
    proc = subprocess.run([sys.executable, "-m", "testbed", "train", str(config_path), "--run-dir",
                           str(run_dir)], cwd=REPO, env=CHILD_ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "already holds a finished run" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(run_dir) == before

    # --resume on a finished run accepts it as it is.
    assert run_cli("train", config_path, "--run-dir", run_dir, "--resume") == 0
    assert "already finished" in capsys.readouterr().out
    assert snapshot(run_dir) == before

    # --overwrite starts again from step 0 (the old log is gone, no resume line).
    assert run_cli("train", config_path, "--run-dir", run_dir, "--overwrite") == 0
    lines = log_lines(run_dir)
    assert len(lines) == 2 and "start at step 0/40" in lines[0] and "done" in lines[1]
    assert_matches_reference(run_dir, reference)


# ----------------------------------------------------------------------------- 3. damaged checkpoints


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [flip_byte, truncate_half], ids=["flipped-byte", "truncated"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(root, config_path, preempted, reference,
                                                                  damage):
    run_dir = fresh_copy(preempted[8], root / f"damaged-{damage.__name__}")
    newest = ckpt.list_checkpoints(run_dir)[-1]
    assert newest.name == "step_00000008"  # the preemption checkpoint
    damage(newest / "model.safetensors")
    with pytest.warns(UserWarning, match=r"step_00000008 is damaged .*model\.safetensors"):
        assert run_cli("train", config_path, "--run-dir", run_dir) == 0
    assert resumed_steps(run_dir) == [6]  # the rolling checkpoint before it
    assert (run_dir / "checkpoints" / ".damaged-step_00000008").is_dir()
    assert any("damaged checkpoint moved aside" in line for line in log_lines(run_dir))
    assert_matches_reference(run_dir, reference)
    # The damaged folder must not linger: checkpoint folders on disk are exactly the live
    # index entries, so retention and the fitter never meet a checkpoint the index forgot.
    live = {line["path"] for line in ckpt.read_index(run_dir) if not line.get("deleted")}
    assert {f"checkpoints/{p.name}" for p in ckpt.list_checkpoints(run_dir)} == live


def test_all_checkpoints_damaged_is_an_error_not_a_restart(root, config_path, preempted, capsys):
    run_dir = fresh_copy(preempted[8], root / "all-damaged")
    folders = ckpt.list_checkpoints(run_dir)
    assert len(folders) >= 3
    for folder in folders:
        flip_byte(folder / "model.safetensors")
    before = snapshot(run_dir)
    with pytest.warns(UserWarning, match="damaged"):
        assert run_cli("train", config_path, "--run-dir", run_dir) == 2
    err = capsys.readouterr().err
    assert "all damaged" in err and "--overwrite" in err
    assert snapshot(run_dir) == before  # no restart from scratch: metrics and log untouched


# ----------------------------------------------------------------------------- 4. index and retention


def test_index_kinds_retention_and_safe_loading(reference, monkeypatch):
    run_dir = reference["dir"]
    index = ckpt.read_index(run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    evals = {s: (v, b) for s, v, b in reference["val"]}
    for line in index:
        assert {"step", "tokens", "flops", "val_loss", "val_bpb", "kind", "path", "lr", "phase"} <= set(line)
        s = line["step"]
        assert line["tokens"] == s * GBT and line["flops"] == s * GBT * run["flops_per_token"]
        assert line["path"] == f"checkpoints/step_{s:08d}"
        assert (line["val_loss"], line["val_bpb"]) == evals[s]  # the eval line of that very step
        assert line["phase"] == ("warmup" if s <= 4 else "decay")  # cosine: decay right after warmup

    by_kind = {k: [x["step"] for x in index if x["kind"] == k] for k in ("science", "rolling", "final")}
    assert set(by_kind["science"]) == SCIENCE and len(by_kind["science"]) == len(SCIENCE)
    assert by_kind["rolling"] == ROLLING
    assert by_kind["final"] == [STEPS]
    deleted = sorted(x["step"] for x in index if x.get("deleted"))
    assert deleted == ROLLING[:-2]  # keep_rolling = 2: only the last two rolling ones survive
    assert not any(x.get("deleted") for x in index if x["kind"] != "rolling")

    on_disk = {int(p.name.split("_")[1]) for p in ckpt.list_checkpoints(run_dir)}
    assert on_disk == SCIENCE | set(ROLLING[-2:])
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]

    # Loading never unpickles: with every pickle entry point disabled, checkpoints still load.
    def no_pickle(*a, **k):
        raise AssertionError("a checkpoint was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    for step in sorted(on_disk):
        folder = run_dir / "checkpoints" / f"step_{step:08d}"
        assert {p.name for p in folder.iterdir()} == CKPT_FILES  # no .pt / .pkl anywhere
        assert checksums_hold(folder)
        weights = load_file(str(folder / "model.safetensors"))
        assert weights and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
        loaded = ckpt.load(folder)
        assert loaded["state"]["step"] == step and loaded["optim"]["state"]
        state = json.loads((folder / "state.json").read_text())
        assert state["kind"] in ("science", "rolling", "final") and state["tokens"] == step * GBT


# ----------------------------------------------------------------------------- 5. preemption


@pytest.mark.parametrize("sig,after", [(signal.SIGUSR1, 5), (signal.SIGTERM, 11)], ids=["SIGUSR1", "SIGTERM"])
def test_preemption_exits_75_with_a_resume_checkpoint(root, config_path, reference, sig, after):
    run_dir = root / f"preempt-{sig.name}"
    proc = child(config_path, run_dir)
    wait_for_training(proc, run_dir, 0, after)
    proc.send_signal(sig)
    assert proc.wait(120) == 75
    st = status(run_dir)
    stopped = st["step"]
    print(f"\n{sig.name} after step {after}: stopped at step {stopped}")
    assert st["state"] == "preempted" and sig.name in st["message"]
    assert after <= stopped < STEPS and last_train_step(run_dir) == stopped
    newest = ckpt.list_checkpoints(run_dir)[-1]
    assert newest.name == f"step_{stopped:08d}" and ckpt.verify(newest) is None
    assert ckpt.read_index(run_dir)[-1]["step"] == stopped
    assert run_cli("train", config_path, "--run-dir", run_dir, "--resume") == 0
    assert resumed_steps(run_dir) == [stopped]
    assert_matches_reference(run_dir, reference, stopped_at=stopped)


def test_a_resume_between_log_lines_keeps_their_averages(root, config_path, reference):
    """With log_every 4 a train line averages four steps; stopping after step 7 must not turn
    the step-8 line into the loss of step 8 alone."""
    config = load_config(config_path, ["train.log_every=4"])
    run_dir = root / "log-every-4"
    preempt_in_process(config, run_dir, 7)
    assert train(config, run_dir)["exit_code"] == 0
    per_step = dict(reference["train"])
    expected = []
    for end in range(4, STEPS + 1, 4):
        window = torch.zeros(())  # the loop sums float32 step losses, then divides in float64
        for s in range(end - 3, end + 1):
            window += torch.tensor(per_step[s])
        expected.append((end, window.item() / 4))
    assert train_losses(run_dir) == expected


# ----------------------------------------------------------------------------- 6. atomicity


def test_leftover_temporary_folder_is_ignored(root, config_path, preempted, reference):
    run_dir = fresh_copy(preempted[7], root / "leftover-tmp")
    # What a kill in the middle of writing checkpoint 9 leaves: a hidden folder, half a file.
    tmp = run_dir / "checkpoints" / ".tmp-step_00000009-4242"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x00" * 100)
    assert [p.name for p in ckpt.list_checkpoints(run_dir)][-1] == "step_00000007"
    assert run_cli("train", config_path, "--run-dir", run_dir) == 0
    assert resumed_steps(run_dir) == [7]
    assert_matches_reference(run_dir, reference, stopped_at=7)
    index = ckpt.read_index(run_dir)
    assert [x["step"] for x in index if x["kind"] == "final"] == [STEPS]
    assert not any(".tmp" in x["path"] for x in index)
    # The checkpoint whose write was cut is written again, as in the uninterrupted run.
    at_9 = [x for x in ckpt.read_index(reference["dir"]) if x["step"] == 9]
    assert len(at_9) == 1 and [x for x in index if x["step"] == 9] == at_9


def test_checkpoint_renamed_but_not_indexed_gets_its_index_line(root, config_path, preempted, reference):
    """A kill between a checkpoint's rename and its index line leaves a complete folder the index
    does not know; resuming from it must write the line, or retention and the fitter miss it."""
    run_dir = fresh_copy(preempted[8], root / "unindexed")
    index_path = run_dir / "checkpoints" / "index.jsonl"
    *kept, cut = index_path.read_text().splitlines()
    assert json.loads(cut)["step"] == 8
    index_path.write_text("".join(line + "\n" for line in kept))
    assert run_cli("train", config_path, "--run-dir", run_dir) == 0
    assert resumed_steps(run_dir) == [8]
    assert_matches_reference(run_dir, reference, stopped_at=8)
    index = ckpt.read_index(run_dir)
    assert [x for x in index if x["step"] == 8] == [dict(json.loads(cut), deleted=True)]  # rolling, retired
    live = {line["path"] for line in index if not line.get("deleted")}
    assert {f"checkpoints/{p.name}" for p in ckpt.list_checkpoints(run_dir)} == live


# ----------------------------------------------------------------------------- 7. cooldown branches

WSD_PEAK = 3.0e-3
WSD_MIN_RATIO = 0.1


@pytest.fixture(scope="module")
def wsd_parent(root, config_path) -> Path:
    run_dir = root / "wsd"
    config = load_config(config_path, ["schedule.name=wsd", "schedule.decay_fraction=0.2",
                                       f"schedule.min_lr_ratio={WSD_MIN_RATIO}", f"optim.lr={WSD_PEAK}",
                                       "checkpoint.every=8", "checkpoint.log_spaced=0",
                                       "checkpoint.at_tokens=[512]", "checkpoint.rolling_every=null"])
    train(config, run_dir)
    assert {p.name for p in ckpt.list_checkpoints(run_dir)} == {
        f"step_{s:08d}" for s in (2, 8, 16, 24, 32, 40)}
    return run_dir


def test_cooldown_branches_follow_the_parent_then_the_decay(wsd_parent):
    parent_lines = read_jsonl(wsd_parent / "metrics.jsonl")
    parent_loss = dict(train_losses(wsd_parent))
    fraction = 0.5
    finals = {}
    for s in (8, 16):
        assert run_cli("branch", wsd_parent, "--step", s, "--decay", fraction, "--shape", "1-sqrt") == 0
        run_dir = wsd_parent / "branches" / f"step{s}_decay{fraction:g}_1-sqrt"
        total = math.ceil(s / (1 - fraction))
        run = json.loads((run_dir / "run.json").read_text())
        assert run["parent"]["step"] == s and Path(run["parent"]["run_dir"]) == wsd_parent.resolve()
        assert run["planned_steps"] == total
        lines = read_jsonl(run_dir / "metrics.jsonl")
        assert [x for x in lines if x["step"] <= s] == [x for x in parent_lines if x["step"] <= s]
        losses = dict(train_losses(run_dir))
        assert sorted(losses) == list(range(1, total + 1))
        # The loss of step s+1 is computed from the weights after step s: the checkpoint's.
        assert losses[s + 1] == parent_loss[s + 1]
        floor = WSD_MIN_RATIO * WSD_PEAK
        for x in lines:
            k = x["step"]
            if k <= s or "train_loss" not in x:
                continue
            p = (k - 1 - s) / (total - s)  # the line for step k logs the lr of 0-based step k-1
            assert x["lr"] == pytest.approx(floor + (WSD_PEAK - floor) * (1 - math.sqrt(p)), rel=1e-12)
        index = ckpt.read_index(run_dir)
        assert [(x["step"], x["kind"]) for x in index] == [(total, "final")]
        assert status(run_dir)["state"] == "done"
        final_eval = [x for x in lines if "val_loss" in x][-1]
        assert final_eval["step"] == total and math.isfinite(final_eval["val_loss"])
        finals[total] = final_eval["val_loss"]
    print(f"\nbranch final val_loss by duration: {finals}")
    assert len(finals) == 2  # one final loss per duration: the points of a loss-vs-D curve


def test_branching_outside_a_stable_phase_is_refused(wsd_parent, reference, capsys):
    cases = [(wsd_parent, 2, "warmup phase"), (wsd_parent, 40, "decay phase"),
             (reference["dir"], 10, "schedule ('cosine') has no stable phase")]
    for parent, s, message in cases:
        assert run_cli("branch", parent, "--step", s, "--decay", 0.5) == 2
        assert message in capsys.readouterr().err
        assert not (parent / "branches" / f"step{s}_decay0.5_1-sqrt").exists()


# ----------------------------------------------------------------------------- 8. divergence


@pytest.mark.parametrize("lr", [1e6, 1e30])
def test_divergence_stops_naming_the_step_and_keeps_checkpoints(root, config_path, lr, capsys):
    run_dir = root / f"nan-{lr:g}"
    code = run_cli("train", config_path, "--run-dir", run_dir, f"optim.lr={lr}", "optim.grad_clip=0",
                   "schedule.name=constant", "schedule.warmup_steps=0", "checkpoint.every=1",
                   "checkpoint.log_spaced=0", "checkpoint.at_tokens=[]", "checkpoint.rolling_every=null")
    assert code == 2
    err = capsys.readouterr().err
    # Either the loss of step `bad` is not finite, or the weights after step `bad` are not
    # (caught before they are saved): both name the step, and no bad checkpoint is written.
    found = re.search(r"the training loss became nan at step (\d+)|the weights became non-finite by step (\d+)", err)
    assert found and "optim.lr" in err, err
    bad = int(found.group(1) or found.group(2))
    assert 1 < bad < STEPS
    st = status(run_dir)
    assert st["state"] == "failed" and f"step {bad}" in st["message"]
    folders = ckpt.list_checkpoints(run_dir)
    assert [p.name for p in folders] == [f"step_{s:08d}" for s in range(1, bad)]
    assert all(checksums_hold(f) for f in folders)
    # The index stays strict JSON (no NaN literals) even when an evaluation was not finite.
    for raw in (run_dir / "checkpoints" / "index.jsonl").read_text().splitlines():
        json.loads(raw, parse_constant=lambda c, raw=raw: pytest.fail(f"index line holds {c}: {raw}"))


def test_killed_after_its_final_checkpoint_a_run_finishes_without_repeating_it(root, config_path, reference):
    """Killed after the final checkpoint but before status.json said done: the resume starts at
    the last step, takes its validation from the log and adds no line to the log or the index."""
    run_dir = fresh_copy(reference["dir"], root / "killed-after-final")
    RunDir(run_dir).write_status("running", step=STEPS, message="killed")
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    index_before = ckpt.read_index(run_dir)
    assert run_cli("train", config_path, "--run-dir", run_dir) == 0
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before
    assert ckpt.read_index(run_dir) == index_before
    summary = json.loads((run_dir / "run.json").read_text())["summary"]
    assert status(run_dir)["state"] == "done" and summary["val_loss"] == reference["val"][-1][1]


# ----------------------------------------------------------------------------- 9. EMA of the weights


def ema_trace(run_dir: Path) -> tuple[list, list]:
    """Train losses and every validation field (the EMA's included), per step."""
    lines = RunDir(run_dir).metrics()
    return ([(m["step"], m["train_loss"]) for m in lines if "train_loss" in m],
            [(m["step"], {k: v for k, v in m.items() if k.startswith("val_")}) for m in lines if "val_loss" in m])


def test_resume_with_the_ema_on_is_exact(root, config_path):
    """The moving average of the weights is saved in every checkpoint and restored: a run cut
    back to its step-20 checkpoint (as a kill before step 30 leaves it: steps 21-29 run again)
    ends exactly like the uninterrupted run, EMA validation and EMA weights included."""
    config = load_config(config_path, ["train.ema_decay=0.9"])
    reference = root / "ema-reference"
    assert train(config, reference)["exit_code"] == 0
    ref_train, ref_val = ema_trace(reference)
    assert len(ref_val) > 5 and all("val_loss_ema" in fields for _, fields in ref_val)
    final_ema = load_file(str(reference / "checkpoints" / f"step_{STEPS:08d}" / "ema.safetensors"))

    run_dir = fresh_copy(reference, root / "ema-cut")
    for folder in ckpt.list_checkpoints(run_dir):
        if ckpt.step_of(folder) > 20:
            shutil.rmtree(folder)
    RunDir(run_dir).write_status("running", step=29, message="killed")
    assert train(config, run_dir)["exit_code"] == 0
    assert resumed_steps(run_dir) == [20]
    assert ema_trace(run_dir) == (ref_train, ref_val)
    assert ckpt.read_index(run_dir) == ckpt.read_index(reference)  # val_loss_ema included
    again = load_file(str(run_dir / "checkpoints" / f"step_{STEPS:08d}" / "ema.safetensors"))
    assert all(torch.equal(again[k], final_ema[k]) for k in final_ema)
