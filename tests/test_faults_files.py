"""Damaged and half-written files: every reader detects the damage and says which file and what
to do (one line, exit 2, no traceback), and no data is lost (earlier checkpoints, logs and
finished runs stay intact).

Run-directory faults use a tiny model (12 steps); each damaged run is resumed and must end with
exactly (==) the losses of the uninterrupted run. Data faults use a small prepared corpus.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from testbed import cli as testbed_cli
from testbed.config import load_config
from testbed.data import loader as data_loader
from testbed.data.shards import TokenShards, prepare
from testbed.errors import TestbedError
from testbed.plan import data_vocab_size
from testbed.rundir import append_jsonl, read_jsonl
from testbed.train import checkpoint as ckpt
from testbed.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
PREEMPT_AT = 7
BASE = {
    "name": "faults",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
    "data": {"source": "synthetic", "seq_len": 32, "val_sequences": 4},
    "optim": {"lr": 3.0e-3},
    "schedule": {"name": "cosine", "warmup_steps": 2},
    "train": {"steps": STEPS, "global_batch_tokens": 256, "eval_every": 2, "log_every": 1, "device": "cpu"},
    # science at 4, 8, 12; rolling at 2, 6, 10 (the newest two kept); a preemption after step 7
    # adds a rolling checkpoint at 7.
    "checkpoint": {"every": 4, "log_spaced": 0, "at_tokens": [], "rolling_every": 2, "keep_rolling": 2},
    "logging": {"wandb": False, "progress": False},
}
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO),
                 PYTHONUNBUFFERED="1")


# ----------------------------------------------------------------------------- helpers


def losses(run_dir: Path) -> tuple[list, list]:
    lines = read_jsonl(run_dir / "metrics.jsonl")
    return ([(m["step"], m["train_loss"]) for m in lines if "train_loss" in m],
            [(m["step"], m["val_loss"]) for m in lines if "val_loss" in m])


def resumed_steps(run_dir: Path) -> list[int]:
    return [int(line.split(" at step ")[1].split("/")[0]) for line in (run_dir / "train.log").read_text().splitlines()
            if "resume from" in line]


def snapshot(run_dir: Path) -> dict[str, tuple[str, int]]:
    """Every file with its hash and mtime, but the lock: whoever opens the run directory takes it
    and writes its host and pid there, a refused trainer too."""
    return {str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != "lock"}


def step_of(folder: Path) -> int:
    return int(folder.name.split("_")[1])


def run_cli(*args) -> int:
    return testbed_cli.main([str(a) for a in args])


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def rewrite_sums(folder: Path) -> None:
    """Make SHA256SUMS agree with the files as they are now (damage the checksums cannot see)."""
    (folder / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256((folder / f).read_bytes()).hexdigest()}  {f}\n" for f in ckpt.FILES))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def config_path(root) -> Path:
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


@pytest.fixture(scope="module")
def reference(root, config_path) -> dict:
    run_dir = root / "reference"
    train(load_config(config_path), run_dir)
    train_lines, val = losses(run_dir)
    assert len(train_lines) == STEPS and all(math.isfinite(x) for _, x in train_lines)
    return {"dir": run_dir, "train": train_lines, "val": val}


@pytest.fixture(scope="module")
def preempted(root, config_path, reference) -> Path:
    """A run stopped by SIGUSR1 after step 7: checkpoints 4 (science), 6 and 7 (rolling)."""
    run_dir = root / "preempted"
    original = data_loader.BatchPlan.batch_tokens

    def batch_tokens(self, step, rank=0, world=1):
        if step == PREEMPT_AT - 1:
            signal.raise_signal(signal.SIGUSR1)
        return original(self, step, rank, world)

    data_loader.BatchPlan.batch_tokens = batch_tokens
    try:
        assert train(load_config(config_path), run_dir)["exit_code"] == 75
    finally:
        data_loader.BatchPlan.batch_tokens = original
    assert [step_of(p) for p in ckpt.list_checkpoints(run_dir)] == [4, 6, 7]
    return run_dir


@pytest.fixture(scope="module")
def resumed_index(root, config_path, preempted) -> list[dict]:
    """The index of the preempted run resumed with nothing damaged."""
    run_dir = shutil.copytree(preempted, root / "undamaged")
    assert run_cli("train", config_path, "--run-dir", run_dir) == 0
    return ckpt.read_index(run_dir)


def copy(preempted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(preempted, tmp_path / "run"))


def assert_exact(run_dir: Path, reference: dict, resumed_at: int) -> None:
    assert resumed_steps(run_dir) == [resumed_at]
    assert losses(run_dir) == (reference["train"], reference["val"])
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"


# ----------------------------------------------------------------------------- JSONL tails


def test_zero_filled_tail_is_a_cut_line_for_reading_and_appending(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "ab") as handle:
        handle.write(b'{"step": 2}' + b"\0" * 300)  # a crash: the size recorded, the newline never written
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    append_jsonl(path, {"step": 3})
    assert path.read_bytes() == b'{"step": 1}\n{"step": 2}\n{"step": 3}\n'  # no line lost, no NUL kept
    with open(path, "ab") as handle:
        handle.write(b'{"st' + b"\0" * 300)
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 3}]
    append_jsonl(path, {"step": 4})
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4] and b"\0" not in path.read_bytes()


@pytest.mark.parametrize("tail", ["cut", "zero-filled", "zeros-after-a-whole-line"])
def test_damaged_tails_then_resume_lose_no_line_and_reindex_orphans(preempted, reference, resumed_index,
                                                                    config_path, tmp_path, tail):
    run_dir = copy(preempted, tmp_path)
    index = run_dir / "checkpoints" / "index.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [2, 4, 6, 7]
    line6 = lines[2].rstrip("\n")
    # The line of checkpoint 6 cut (or zero-filled) by a crash, the line of checkpoint 7 never
    # written: both folders are complete on disk.
    damaged = {"cut": line6[:25], "zero-filled": line6[:25] + "\0" * 500,
               "zeros-after-a-whole-line": line6 + "\0" * 500}[tail]
    index.write_bytes(("".join(lines[:2]) + damaged).encode())
    metrics = run_dir / "metrics.jsonl"
    with open(metrics, "ab") as handle:
        handle.write(b'{"step": 8, "tr' + (b"\0" * 700 if tail != "cut" else b""))
    assert run_cli("train", config_path, "--run-dir", run_dir) == 0
    assert_exact(run_dir, reference, PREEMPT_AT)
    assert ckpt.read_index(run_dir) == resumed_index  # checkpoints 6 and 7 indexed again
    live = {line["path"] for line in resumed_index if not line.get("deleted")}
    assert {f"checkpoints/{p.name}" for p in ckpt.list_checkpoints(run_dir)} == live
    assert b"\0" not in index.read_bytes() + metrics.read_bytes()


def test_interrupted_save_folders_are_cleared_at_resume(preempted, reference, config_path, tmp_path):
    run_dir = copy(preempted, tmp_path)
    root = run_dir / "checkpoints"
    tmp = root / ".tmp-step_00000008-4242"  # a kill while writing checkpoint 8
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\0" * 100)
    shutil.copytree(root / "step_00000004", root / ".old-step_00000004-4242")  # replaced, not yet removed
    os.replace(root / "step_00000006", root / ".old-step_00000006-4243")  # a kill between the two renames
    assert run_cli("train", config_path, "--run-dir", run_dir) == 0
    assert_exact(run_dir, reference, PREEMPT_AT)
    assert not [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    log = (run_dir / "train.log").read_text()
    assert "removed" in log and f"restored {root / 'step_00000006'}" in log


# ----------------------------------------------------------------------------- run.json and status.json


@pytest.mark.parametrize("damage", ["run.json missing", "run.json empty", "status.json empty",
                                    "both zero-filled"])
def test_resume_without_a_readable_run_record(preempted, reference, config_path, tmp_path, damage):
    run_dir = copy(preempted, tmp_path)
    if damage == "run.json missing":
        (run_dir / "run.json").unlink()
    elif damage == "run.json empty":
        (run_dir / "run.json").write_text("")
    elif damage == "status.json empty":
        (run_dir / "status.json").write_text("")
    else:
        for name in ("run.json", "status.json"):
            (run_dir / name).write_bytes(b"\0" * 64)
    with pytest.warns(UserWarning, match="run.json|status.json"):
        assert run_cli("train", config_path, "--run-dir", run_dir, "--resume") == 0
    assert_exact(run_dir, reference, PREEMPT_AT)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["config"] == json.loads((reference["dir"] / "run.json").read_text())["config"]
    assert run["summary"]["steps"] == STEPS
    assert "run.json" in (run_dir / "train.log").read_text() or "status.json" in (run_dir / "train.log").read_text()


def test_missing_run_json_with_another_config_is_refused(preempted, config_path, tmp_path, capsys):
    run_dir = copy(preempted, tmp_path)
    (run_dir / "run.json").unlink()
    before = snapshot(run_dir)
    with pytest.warns(UserWarning, match="run.json"):
        assert run_cli("train", config_path, "--run-dir", run_dir, "optim.lr=1e-3") == 2
    one_line_error(capsys, "different config", "optim.lr", "state.json")
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k != "train.log"} == {k: v for k, v in before.items()
                                                                   if k != "train.log"}


# ----------------------------------------------------------------------------- full disk


def test_full_disk_during_a_checkpoint_is_one_clear_error(preempted, reference, config_path, tmp_path,
                                                          monkeypatch, capsys):
    run_dir = copy(preempted, tmp_path)
    real_save_file = ckpt.save_file

    def full(tensors, filename, *args, **kwargs):
        if "step_00000008" in filename and "optim" in filename:
            Path(filename).write_bytes(b"\0" * 1000)  # half written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full)
    assert run_cli("train", config_path, "--run-dir", run_dir) == 2
    one_line_error(capsys, "step_00000008", "no space left", "MB needed", "--resume")
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert all(ckpt.verify(p) is None for p in ckpt.list_checkpoints(run_dir))
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    monkeypatch.setattr(ckpt, "save_file", real_save_file)
    assert run_cli("train", config_path, "--run-dir", run_dir, "--resume") == 0
    assert losses(run_dir) == (reference["train"], reference["val"])


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a small tmpfs at `path`; the reason when that is impossible here."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        return "mounting a tmpfs needs Linux and mount(8)"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (CI runs as root)"
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip()}"


def test_full_tmpfs_stops_with_one_line_and_resumes_exactly(reference, config_path, tmp_path, capsys):
    disk = tmp_path / "disk"
    reason = _mount_tmpfs(disk, "2m")
    if reason:
        pytest.skip(reason)
    try:
        run_dir = disk / "run"
        # One checkpoint per step (science: none deleted) fills 2 MB within the run.
        code = run_cli("train", config_path, "--run-dir", run_dir, "checkpoint.every=1")
        assert code == 2
        err = one_line_error(capsys, "no space left", "--resume")
        folders = ckpt.list_checkpoints(run_dir)
        assert folders and all(ckpt.verify(p) is None for p in folders)
        assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
        assert ckpt.folder_name(step_of(folders[-1]) + 1) in err
        moved = Path(shutil.copytree(run_dir, tmp_path / "moved"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    assert run_cli("train", config_path, "--run-dir", moved, "checkpoint.every=1", "--resume") == 0
    train_lines, val = losses(moved)  # a checkpoint every step validates every step
    assert train_lines == reference["train"] and [v for v in val if v[0] % 2 == 0] == reference["val"]


def _fill(folder: Path) -> None:
    """Write a filler file in `folder` until its file system is full (a real ENOSPC)."""
    with open(folder / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC, err


NO_CHECKPOINTS = {"every": None, "log_spaced": 0, "at_tokens": [], "rolling_every": None, "final": False}


def test_full_tmpfs_during_metrics_appends_fails_the_run_in_one_line(root, tmp_path, capsys):
    """The disk fills at step 3 (a real tmpfs, no checkpoint to blame): the metrics appends that
    no longer fit stop the run with one line, no partial line is left, and status.json says
    failed with that line although there is no room for a new copy of it."""
    disk = tmp_path / "disk"
    reason = _mount_tmpfs(disk, "1m")
    if reason:
        pytest.skip(reason)
    config = tmp_path / "nockpt.yaml"
    config.write_text(yaml.safe_dump({**BASE, "checkpoint": NO_CHECKPOINTS,
                                      "train": {**BASE["train"], "steps": 60}}))
    original = data_loader.BatchPlan.batch_tokens

    def batch_tokens(self, step, rank=0, world=1):
        if step == 3 and not (disk / "filler").exists():
            _fill(disk)
        return original(self, step, rank, world)

    run_dir = disk / "run"
    try:
        data_loader.BatchPlan.batch_tokens = batch_tokens
        try:
            code = run_cli("train", config, "--run-dir", run_dir)
        finally:
            data_loader.BatchPlan.batch_tokens = original
        assert code == 2
        err = one_line_error(capsys, "metrics.jsonl", "no space left", "Free space")
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "failed" and status["message"] == err.removeprefix("error: ")
        assert (run_dir / "metrics.jsonl").read_bytes().endswith(b"\n")  # no partial line left
        steps = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "train_loss" in m]
        assert 3 <= len(steps) < 60 and steps == list(range(1, len(steps) + 1))
        (disk / "filler").unlink()
        assert run_cli("train", config, "--run-dir", run_dir) == 0  # no checkpoint: it starts again
        assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize(("name", "code", "names"), [("metrics.jsonl", errno.EDQUOT, "metrics.jsonl"),
                                                     ("train.log", errno.EROFS, "train.log"),
                                                     ("index.jsonl", errno.ENOSPC, "its index line")])
def test_storage_errors_on_run_files_are_one_line_and_a_failed_status(preempted, config_path, tmp_path,
                                                                      monkeypatch, capsys, name, code, names):
    """An append the storage refuses (injected at the write: over quota, read-only, full) is the
    one line a checkpoint's full disk gives (an index line's is the checkpoint's), and the run
    ends failed with it."""
    run_dir = copy(preempted, tmp_path)
    real_write = os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/" + name):
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    assert run_cli("train", config_path, "--run-dir", run_dir) == 2
    monkeypatch.undo()
    reason = {errno.EDQUOT: "quota", errno.EROFS: "read-only", errno.ENOSPC: "no space left"}[code]
    err = one_line_error(capsys, names, reason, "Free space")
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["message"] == err.removeprefix("error: ")
    assert all(ckpt.verify(p) is None for p in ckpt.list_checkpoints(run_dir))


# ----------------------------------------------------------------------------- damaged records


def make_sweep(reference: Path, root: Path) -> Path:
    """A sweep directory whose one run is a copy of the finished reference run."""
    from testbed.sweep.registry import Registry
    from testbed.sweep.spec import load_sweep

    registry = Registry(root / "sweep")
    (run_id,) = registry.add_runs(load_sweep({"name": "faults", "base": BASE, "grid": {"train.seed": [0]}}))
    shutil.rmtree(registry.run_dir(run_id), ignore_errors=True)
    shutil.copytree(reference, registry.run_dir(run_id))
    with registry.locked():
        record = registry.read(run_id)
        registry.set_state(record, "done")
        registry.write(record)
    return registry.root


# (command, file damaged, the line appended): lines that parse but are not a record of that file
@pytest.mark.parametrize(("command", "name", "line"), [
    ("resume", "checkpoints/index.jsonl", '{"kind": "rolling"}'),
    ("resume", "checkpoints/index.jsonl", "[1, 2]"),
    ("resume", "metrics.jsonl", "3"),
    ("average", "checkpoints/index.jsonl", '{"kind": "rolling"}'),
    ("fit collect", "checkpoints/index.jsonl", "[]"),
    ("fit collect", "averages.jsonl", '{"val_loss": 1.0}'),
    ("fit", "metrics.jsonl", '"x"'),
    ("fit", "checkpoints/index.jsonl", '{"step": 4, "kind": "rolling"}'),
    ("sweep status", "metrics.jsonl", "[]"),
])
def test_lines_that_are_not_records_are_damage_for_every_reader(preempted, reference, config_path, tmp_path,
                                                                capsys, command, name, line):
    if command == "resume":
        run_dir = copy(preempted, tmp_path)
        args: tuple = ("train", config_path, "--run-dir", run_dir, "--resume")
    else:
        top = make_sweep(reference["dir"], tmp_path)
        (run_dir,) = (top / "runs").iterdir()
        args = {"average": ("average", run_dir, "--last", 1),
                "fit collect": ("fit", "collect", top, "--out", tmp_path / "points.csv"),
                "fit": ("fit", top, "--no-plots", "--out", tmp_path / "fit"),
                "sweep status": ("sweep", "status", top)}[command]
    path = run_dir / name
    with open(path, "a") as handle:
        handle.write(line + "\n")
    lines = len(path.read_text().splitlines())
    before = snapshot(run_dir)
    assert run_cli(*args) == 2
    one_line_error(capsys, f"{path.name} line {lines}", "damaged", "repair or delete")
    assert snapshot(run_dir) == before


# ----------------------------------------------------------------------------- links in a run directory


@pytest.mark.parametrize("where", [("lock", "metrics.jsonl"), ("metrics.jsonl",), ("status.json",),
                                   ("train.log",), ("run.json",)])
def test_a_link_where_a_run_file_belongs_is_refused_and_its_target_kept(preempted, config_path, tmp_path,
                                                                        capsys, where):
    run_dir = copy(preempted, tmp_path)
    outside = tmp_path / "precious.txt"
    outside.write_bytes(b"precious, not the testbed's\n")
    for name in where:
        (run_dir / name).unlink(missing_ok=True)
        (run_dir / name).symlink_to(outside)
    before = snapshot(run_dir)
    assert run_cli("train", config_path, "--run-dir", run_dir) == 2
    one_line_error(capsys, str(run_dir / where[0]), "symbolic link", "remove the link")
    assert outside.read_bytes() == b"precious, not the testbed's\n"
    assert snapshot(run_dir) == before and all((run_dir / name).is_symlink() for name in where)


@pytest.mark.parametrize("name", ["lock", "metrics.jsonl", "checkpoints/index.jsonl"])
def test_a_directory_where_a_run_file_belongs_is_one_line(preempted, config_path, tmp_path, capsys, name):
    run_dir = copy(preempted, tmp_path)
    (run_dir / name).unlink(missing_ok=True)
    (run_dir / name).mkdir()
    before = snapshot(run_dir)
    assert run_cli("train", config_path, "--run-dir", run_dir) == 2
    one_line_error(capsys, str(run_dir / name), "directory")
    assert snapshot(run_dir) == before


# ----------------------------------------------------------------------------- damaged checkpoints


def test_unparseable_state_json_is_a_damaged_checkpoint(preempted, reference, config_path, tmp_path):
    run_dir = copy(preempted, tmp_path)
    newest = run_dir / "checkpoints" / "step_00000007"
    (newest / "state.json").write_text('{"step": 7, "kind": "roll')
    rewrite_sums(newest)  # the checksums agree: only parsing finds the damage
    with pytest.warns(UserWarning, match=r"step_00000007 is damaged \(state.json"):
        assert run_cli("train", config_path, "--run-dir", run_dir) == 0
    assert_exact(run_dir, reference, 6)
    assert (run_dir / "checkpoints" / ".damaged-step_00000007").is_dir()


def test_damaged_index_line_in_the_middle_is_an_actionable_error(preempted, config_path, tmp_path, capsys):
    run_dir = copy(preempted, tmp_path)
    index = run_dir / "checkpoints" / "index.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"
    index.write_text("".join(lines))
    before = snapshot(run_dir)
    assert run_cli("train", config_path, "--run-dir", run_dir) == 2
    one_line_error(capsys, "index.jsonl line 2", "delete", "--resume")
    assert snapshot(run_dir) == before  # nothing rewritten before the error


def test_stray_folders_in_checkpoints_are_ignored(preempted, reference, config_path, tmp_path):
    run_dir = copy(preempted, tmp_path)
    root = run_dir / "checkpoints"
    for stray in ("step_abc", "notes", "step_00000009.bak"):
        (root / stray).mkdir()
        (root / stray / "README").write_text("mine")
    (root / "step_00000010").write_text("a file, not a checkpoint folder")
    assert run_cli("train", config_path, "--run-dir", run_dir) == 0
    assert_exact(run_dir, reference, PREEMPT_AT)
    for stray in ("step_abc", "notes", "step_00000009.bak"):
        assert (root / stray / "README").read_text() == "mine"


# ----------------------------------------------------------------------------- data files


WORDS = "the of and to in is that it for was on are as with his they at be this from have or by".split()


def write_corpus(path: Path, n: int = 240) -> Path:
    rng = np.random.default_rng(0)
    docs = [f"Doc {i}. " + " ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))) for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def shards(data_root) -> Path:
    out = data_root / "shards"
    prepare(write_corpus(data_root / "corpus.jsonl"), out, vocab_size=300, shard_tokens=3000,
            cache_dir=data_root / "cache")
    return out


def test_malformed_source_line_names_file_and_line(data_root, tmp_path, capsys):
    source = write_corpus(tmp_path / "corpus.jsonl", n=40)
    lines = source.read_text().splitlines(keepends=True)
    lines[4] = lines[4][:15] + "\n"
    source.write_text("".join(lines))
    code = run_cli("data", "prepare", "--source", source, "--vocab-size", 300, "--out", tmp_path / "out",
                   "--cache-dir", tmp_path / "cache")
    assert code == 2
    one_line_error(capsys, f"{source}:5", "not valid JSON")


@pytest.mark.parametrize("edit", ["edited", "garbage"])
def test_edited_or_garbage_manifest_is_detected(shards, tmp_path, edit):
    folder = Path(shutil.copytree(shards, tmp_path / "shards"))
    manifest = folder / "manifest.json"
    if edit == "edited":
        data = json.loads(manifest.read_text())
        data["splits"]["train"]["bytes"] += 1  # still valid JSON, no longer what was prepared
        manifest.write_text(json.dumps(data, indent=1))
    else:
        manifest.write_bytes(b"\0" * 40)
    with pytest.raises(TestbedError, match=r"manifest.json .*testbed data prepare"):
        TokenShards(folder)
    config = SimpleNamespace(data=SimpleNamespace(path=str(folder), source="shards"))
    with pytest.raises(TestbedError, match=r"manifest.json .*testbed data prepare"):
        data_vocab_size(config)  # type: ignore[arg-type]  # what a training config reads first


@pytest.mark.parametrize("damage", ["missing", "garbage", "edited"])
def test_missing_or_garbage_token_bytes_is_a_clear_error(shards, tmp_path, damage):
    folder = Path(shutil.copytree(shards, tmp_path / "shards"))
    table = folder / "token_bytes.npy"
    if damage == "missing":
        table.unlink()
    elif damage == "garbage":
        table.write_bytes(b"not a numpy file" * 10)
    else:
        values = np.load(table)
        values[5] += 1
        np.save(table, values)
    with pytest.raises(TestbedError, match=r"token_bytes\.npy .*testbed data prepare"):
        TokenShards(folder)


@pytest.mark.slow
def test_killed_prepare_takes_its_workers_with_it(data_root, tmp_path):
    source = write_corpus(tmp_path / "corpus.jsonl", n=400)
    out = tmp_path / "out"
    env = dict(CHILD_ENV, TESTBED_PREPARE_PAUSE_AFTER_SHARD="60")
    proc = subprocess.Popen([sys.executable, "-m", "testbed", "data", "prepare", "--source", str(source),
                             "--vocab-size", "300", "--out", str(out), "--workers", "2", "--shard-tokens", "2000",
                             "--cache-dir", str(tmp_path / "cache")], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*-00000.bin")):  # a shard written: the workers exist, the parent sleeps
            assert proc.poll() is None and time.monotonic() < deadline, "prepare never wrote a shard"
            time.sleep(0.05)
        workers = children(proc.pid)
        assert len(workers) >= 2, workers
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 15
        while [p for p in workers if alive(p)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in workers if alive(p)], "tokenising workers outlived a SIGKILLed prepare"
    finally:
        if proc.poll() is None:
            proc.kill()


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
