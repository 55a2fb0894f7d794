"""The run directory: the contract between the trainer, sweeps and the fitter (docs/run-directory.md).

Every file of a run directory is named, written and read here, and nowhere else:

    RUN_DIR/run.json               resolved config, derived quantities, summary at the end
    RUN_DIR/status.json            {"state", "step", "message", ...}
    RUN_DIR/metrics.jsonl          one JSON object a line
    RUN_DIR/train.log              the human-readable log
    RUN_DIR/checkpoints/index.jsonl, checkpoints/step_XXXXXXXX/
    RUN_DIR/averages.jsonl         evaluations of averaged checkpoints (`testbed average`)
    RUN_DIR/branches/<name>/       cooldown branches, each a run directory of its own
    RUN_DIR/lock                   flock held by the one process that writes the run (RunDir.acquire)

Writes are atomic (a hidden temporary file, fsynced and renamed), so a reader never sees half a
JSON file. JSONL files are appended a whole line at a time; a kill can still cut the last line,
and that is the one thing the reader forgives: any other unreadable line is damage and an error
that names the file and the line. An append first drops such a cut tail, so the cut line can
only ever be the last one. JSON has no NaN or infinity: they are written as null, so every
reader, not only Python's, parses every file.

Standard library only: sweeps, the fitter and SLURM hooks read run directories without torch.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from testbed import exits
from testbed.errors import TestbedError

RUN_JSON = "run.json"
STATUS_JSON = "status.json"
METRICS = "metrics.jsonl"
TRAIN_LOG = "train.log"
CHECKPOINTS = "checkpoints"
INDEX = "index.jsonl"
AVERAGES = "averages.jsonl"
BRANCHES = "branches"
CONFIG_YAML = "config.yaml"  # written by a sweep before the trainer starts
LOCK = "lock"  # flock of the process that writes the run; holds {"host", "pid", "since"}

# status.json states (the registry of a sweep has states of its own).
STATES = ("running", "done", "failed", "preempted")

HASH_CHARS = 10
# Config keys that name or describe a run without changing a number it produces.
COSMETIC_KEYS = ("name", "labels", "logging")


# ----------------------------------------------------------------------------- files


def clean(value: Any) -> Any:
    """NaN and infinity (a diverging run evaluates to NaN) become null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def to_json(data: Any, indent: int | None = None, sort_keys: bool = False) -> str:
    return json.dumps(clean(data), indent=indent, sort_keys=sort_keys, default=str)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str, fsync: bool = False) -> None:
    """Replace `path` with `text` in one rename; fsync=True also survives a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any, sort_keys: bool = False, fsync: bool = False) -> None:
    write_text_atomic(path, to_json(data, indent=1, sort_keys=sort_keys), fsync=fsync)


def read_json(path: Path) -> dict[str, Any] | None:
    """The object in a JSON file; None when the file does not exist. Files here are written
    atomically, so one that does not parse was damaged or edited: an error naming it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        what = "empty" if not raw.strip(b"\0 \n") else f"not valid JSON ({err})"
        raise TestbedError(f"{path} is {what}; restore it from a backup or remove it (a run without "
                           f"run.json is rebuilt from its checkpoints on --resume)") from None
    if not isinstance(data, dict):
        raise TestbedError(f"{path} holds a JSON {type(data).__name__}, not an object; restore it "
                           f"from a backup or remove it")
    return data


def _split_lines(path: Path) -> tuple[list[str], bool]:
    """(lines, whether the last one is cut: no newline after it). NUL bytes at the end are the
    zero-filled tail a node crash leaves (the size was recorded, the data never written): a cut."""
    data = path.read_bytes().rstrip(b"\0").decode("utf-8", errors="replace")
    if not data:
        return [], False
    cut = not data.endswith("\n")
    return data.splitlines(), cut


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file. Only a last line cut by a kill mid-write is skipped; any
    other line that does not parse is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines, cut = _split_lines(path)
    rows = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rows.append(json.loads(raw))
        except json.JSONDecodeError:
            if number == len(lines) and cut:
                break  # the write a kill interrupted
            raise TestbedError(f"{path} line {number} is not valid JSON ({raw[:60]!r}); it was damaged "
                               f"after being written: repair or delete that line")
    return rows


def _drop_cut_tail(path: Path) -> None:
    """Truncate a JSONL file after its last newline, so the next line starts on its own; a last
    line that is a whole record (read_jsonl returns it) keeps it, with its newline restored."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)  # rare: a kill cut the last append, or a crash left a zero-filled tail
        data = handle.read().rstrip(b"\0")
        start = data.rfind(b"\n") + 1
        try:  # a whole record that lost only its newline (or only zeros follow it) is kept
            complete = isinstance(json.loads(data[start:].decode("utf-8")), dict)
        except ValueError:
            complete = False
        handle.seek(len(data) if complete else start)
        handle.truncate()
        if complete:
            handle.write(b"\n")


def append_jsonl(path: Path, record: dict[str, Any], fsync: bool = False) -> None:
    path = Path(path)
    _drop_cut_tail(path)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(to_json(record) + "\n")
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())


def write_jsonl_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(to_json(r) + "\n" for r in records))


# ----------------------------------------------------------------------------- run ids


# Keys that change no number a run computes: the preset's and the depth dial's (their shape is
# filled in), and observers and guards of the loss (the tasks scored beside it included).
UNCOUNTED_KEYS = {"model": ("preset", "depth", "depth_aspect", "depth_head_dim"),
                  "train": ("spike_nats", "divergence_nats", "tasks")}
# Keys added after runs were first registered, left out while at their defaults, so the ids of
# runs that do not use them stay as they were.
LATER_DEFAULTS = {("train", "flops"): None, ("optim", "z_loss"): 0.0, ("train", "ema_decay"): None,
                  ("model", "mup_base_head_dim"): None,
                  ("model", "parametrization"): "sp", ("model", "mup_base_width"): None}


def config_hash(tree: dict[str, Any]) -> str:
    """A short hash of what a config computes: its name, labels, logging and UNCOUNTED_KEYS do
    not count. The one hash of a config: sweeps name runs by it, standalone runs use it as id."""
    tree = {k: v for k, v in tree.items() if k not in COSMETIC_KEYS}
    for section, keys in UNCOUNTED_KEYS.items():
        if isinstance(tree.get(section), dict):
            tree[section] = {k: v for k, v in tree[section].items() if k not in keys}
    for (section, key), default in LATER_DEFAULTS.items():
        if isinstance(tree.get(section), dict) and tree[section].get(key, default) == default:
            tree[section] = {k: v for k, v in tree[section].items() if k != key}
    canonical = json.dumps(tree, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:HASH_CHARS]


def run_id(tree: dict[str, Any]) -> str:
    """A run's id: its config's name (a sweep names each run), else the config's hash."""
    return tree.get("name") or config_hash(tree)


# ----------------------------------------------------------------------------- ownership


class RunDirBusy(TestbedError):
    """Another live process owns the run directory: this one must not write anything in it."""

    exit_code = exits.BUSY

    def __init__(self, message: str, holder: dict[str, Any] | None = None):
        super().__init__(message)
        self.holder = holder or {}


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "another process (it has not recorded itself yet)"
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"pid {holder['pid']} on host {holder.get('host', '?')}{since}"


class RunLock:
    """The exclusive flock on RUN_DIR/lock. The kernel drops it when the holder's process ends
    however it ends (SIGKILL included), so a lock is never left behind by a dead process."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


# ----------------------------------------------------------------------------- one run


class RunDir:
    """The files of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    run_json = property(lambda self: self.path / RUN_JSON)
    status_json = property(lambda self: self.path / STATUS_JSON)
    metrics_path = property(lambda self: self.path / METRICS)
    log_path = property(lambda self: self.path / TRAIN_LOG)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    index_path = property(lambda self: self.path / CHECKPOINTS / INDEX)
    averages_path = property(lambda self: self.path / AVERAGES)
    branches = property(lambda self: self.path / BRANCHES)
    config_yaml = property(lambda self: self.path / CONFIG_YAML)

    lock_path = property(lambda self: self.path / LOCK)

    def exists(self) -> bool:
        return self.run_json.is_file()

    # ownership: one live writer at a time
    def acquire(self, patience_s: float = 1.0) -> RunLock:
        """Own this run directory until release() or the end of the process; RunDirBusy (exit
        BUSY) when another live process owns it. Readers that probe the lock (lock_holder) hold
        it for microseconds, hence the short patience."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + patience_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    holder = _read_holder(self.lock_path)
                    raise RunDirBusy(
                        f"run directory {str(self.path)!r} is in use by {describe_holder(holder)}; "
                        f"two trainers must not write one run. Wait for it to finish, or stop it "
                        f"(kill -TERM {holder.get('pid', 'PID')} saves a resume checkpoint) and "
                        f"run this again", holder) from None
                time.sleep(0.05)
        record = to_json({"host": socket.gethostname(), "pid": os.getpid(),
                          "since": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        return RunLock(self.lock_path, fd)

    def lock_holder(self) -> dict[str, Any] | None:
        """Who owns the run directory now ({"host", "pid", "since"}, {} when it has not said
        yet), or None when nobody does. Creates nothing: a read-only look."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return _read_holder(self.lock_path)
        finally:
            os.close(fd)
        return None

    # run.json and status.json
    def read_run(self) -> dict[str, Any] | None:
        return read_json(self.run_json)

    def write_run(self, data: dict[str, Any]) -> None:
        write_json_atomic(self.run_json, data)

    def read_status(self) -> dict[str, Any]:
        return read_json(self.status_json) or {}

    def write_status(self, state: str, **fields: Any) -> None:
        if state not in STATES:
            raise ValueError(f"status state {state!r} is not one of {STATES}")
        write_json_atomic(self.status_json, {"state": state, **fields})

    def status_stamp(self) -> tuple[int, int] | None:
        """Identity of status.json as it is now: every write replaces the file (a new inode), so
        a different stamp later means a process wrote it meanwhile."""
        try:
            stat = self.status_json.stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    # train.log
    def log(self, text: str) -> None:
        """One timestamped line of the human-readable log."""
        with open(self.log_path, "a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    # metrics.jsonl
    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, record)

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        write_jsonl_atomic(self.metrics_path, records)

    # checkpoints/index.jsonl
    def index(self) -> list[dict[str, Any]]:
        return read_jsonl(self.index_path)

    def append_index(self, line: dict[str, Any]) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.index_path, line, fsync=True)

    def write_index(self, lines: list[dict[str, Any]]) -> None:
        write_jsonl_atomic(self.index_path, lines)

    # averages.jsonl
    def averages(self) -> list[dict[str, Any]]:
        return read_jsonl(self.averages_path)

    def append_average(self, record: dict[str, Any]) -> None:
        append_jsonl(self.averages_path, record, fsync=True)

    # branches
    def branch(self, name: str) -> RunDir:
        return RunDir(self.branches / name)

    def branch_dirs(self) -> list[RunDir]:
        if not self.branches.is_dir():
            return []
        return [RunDir(p.parent) for p in sorted(self.branches.glob(f"*/{RUN_JSON}"))]

    def with_branches(self) -> Iterator[RunDir]:
        """This run, then its branches (and theirs), depth first."""
        yield self
        for branch in self.branch_dirs():
            yield from branch.with_branches()


# ----------------------------------------------------------------------------- many runs


def find_runs(root: str | Path) -> list[RunDir]:
    """Every run under `root`, branches included: a sweep directory's runs/<id>/, a single run
    directory, or any folder searched for run.json (inside checkpoints/ and wandb/ never)."""
    root = Path(root)
    if not root.is_dir():
        raise TestbedError(f"{str(root)!r} does not exist; pass a sweep directory or a folder of run "
                           f"directories")
    if (root / RUN_JSON).is_file():
        return list(RunDir(root).with_branches())
    sweep_runs = root / "runs"
    if sweep_runs.is_dir():
        tops = [RunDir(p.parent) for p in sorted(sweep_runs.glob(f"*/{RUN_JSON}"))]
    else:
        tops = []
        for path in sorted(root.rglob(RUN_JSON)):
            parts = path.relative_to(root).parts[:-1]
            # A branch is reached through its parent, and nothing inside a run's private
            # folders is a run.
            if BRANCHES in parts or CHECKPOINTS in parts or "wandb" in parts:
                continue
            tops.append(RunDir(path.parent))
    return [run for top in tops for run in top.with_branches()]
