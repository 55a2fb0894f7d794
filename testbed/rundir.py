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
and that is the one thing the reader forgives: any other unreadable line, or one that is not a
record of its file (RECORD_KEYS), is damage and an error that names the file and the line. An
append first drops such a cut tail, so the cut line can only ever be the last one. JSON has no
NaN or infinity: they are written as null, so every reader, not only Python's, parses every file.

Every write opens its file here, and only here (_open): never through a symbolic link, and only
a regular file, so a link or a folder where a run file belongs is one error naming it. A write
the storage refuses for good (STORAGE_ERRORS: full, over quota, read-only) is one StorageError
line, the checkpoints' included, instead of a traceback.

Standard library only: sweeps, the fitter and SLURM hooks read run directories without torch.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import stat
import time
from collections.abc import Iterator, Mapping
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
CONFIG_YAML = "config.yaml"  # the resolved config: by a sweep before the trainer starts, by the trainer at start
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


# ----------------------------------------------------------------------------- refused writes

# A write that fails with one of these cannot succeed by retrying: one clear error, not a traceback.
STORAGE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "the file system is read-only"}


class StorageError(TestbedError, OSError):
    """A write the storage refused for good (STORAGE_ERRORS): one line for the user, as every
    TestbedError, and still an OSError with its errno for code that tolerates a failed write."""

    def __init__(self, code: int, message: str):
        OSError.__init__(self, code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def storage_error(err: OSError, path: Path, what: str | None = None, needed: int = 0, state: str = "",
                  again: str = "run the same command again") -> OSError:
    """A full, over-quota or read-only disk as one StorageError naming what could not be written,
    the cause, the space needed and free, what was left (`state`) and the fix; any other OSError
    as it is. The one message for every file the testbed writes, checkpoints included."""
    if err.errno not in STORAGE_ERRORS:
        return err
    path = Path(path)
    try:
        folder = next(p for p in path.parents if p.is_dir())
        free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free there"
    except (OSError, StopIteration):
        free = ""
    space = ", ".join(part for part in (f"about {needed / 1e6:.1f} MB needed" if needed else "", free) if part)
    return StorageError(err.errno, f"{what or repr(str(path))} could not be written: {STORAGE_ERRORS[err.errno]}"
                                   f"{f' ({space})' if space else ''}{f'; {state}' if state else ''}. Free space "
                                   f"(or raise the quota, or move the folder to writable storage), then {again}")


def not_a_file(path: Path) -> TestbedError | None:
    """The error for a symbolic link, a folder or anything but a regular file at `path`, where
    the testbed keeps a file; None when it is a file or nothing is there."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return TestbedError(f"{str(path)!r} is a symbolic link; the testbed never reads or writes its files "
                            f"through a link (it could point anywhere, into another run included): remove "
                            f"the link (what it points to is left as it is) and run the same command again")
    kind = "directory" if stat.S_ISDIR(mode) else "special file, not a regular file,"
    return TestbedError(f"{str(path)!r} is a {kind} where the testbed keeps a file; move it away and run "
                        f"the same command again")


def _open(path: Path, flags: int) -> int:
    """The one way a file is opened here: never through a symbolic link (O_NOFOLLOW) and only a
    regular file, else one error naming it (O_NONBLOCK: a FIFO put there cannot hang the open).
    Other failures are the OSError os.open gives, for the caller to name (storage_error)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise not_a_file(path) or err from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder opens for reading
        os.close(fd)
        raise not_a_file(path) or TestbedError(f"{str(path)!r} is not a regular file") from None
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_all(path: Path) -> bytes | None:
    """The bytes of a file (None when it does not exist), opened as _open does."""
    try:
        fd = _open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- writing and reading


def write_text_atomic(path: Path, text: str, fsync: bool = False, links: str = "replace") -> None:
    """Replace `path` with `text` in one rename; fsync=True also survives a power cut. The
    hidden temporary file is created anew (O_EXCL, never through a link); a link at `path` is
    replaced, not followed, or with links="refuse" (run-directory files) an error naming it."""
    path = Path(path)
    problem = not_a_file(path)
    if problem is not None and (links == "refuse" or not path.is_symlink()):
        raise problem
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = _open(tmp, flags)
        except FileExistsError:  # left by a dead process with this pid, or a link put there
            tmp.unlink()
            fd = _open(tmp, flags)
        try:
            _write_all(fd, text.encode("utf-8"))
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise storage_error(err, path) from None


def write_json_atomic(path: Path, data: Any, sort_keys: bool = False, fsync: bool = False,
                      links: str = "replace") -> None:
    write_text_atomic(path, to_json(data, indent=1, sort_keys=sort_keys), fsync=fsync, links=links)


def overwrite_in_place(path: Path, text: str) -> None:
    """Write `text` over a small existing file in the blocks it already has: the way to record
    something (a run's failure) on a disk too full for a new copy. Not atomic, so only the last
    resort; shorter text is padded with spaces, which JSON ignores, so no stale byte remains.
    Raises the storage's error when the text does not fit the blocks the file holds."""
    data = text.encode("utf-8")
    fd = _open(path, os.O_WRONLY)  # FileNotFoundError when there is nothing to overwrite
    try:
        info = os.fstat(fd)
        if len(data) > max(info.st_size, info.st_blocks * 512):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        data = data.ljust(info.st_size, b" ")
        if os.pwrite(fd, data, 0) != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    except OSError as err:
        raise storage_error(err, path) from None
    finally:
        os.close(fd)


def read_json(path: Path) -> dict[str, Any] | None:
    """The object in a JSON file; None when the file does not exist. Files here are written
    atomically, so one that does not parse was damaged or edited: an error naming it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise not_a_file(path) or TestbedError(f"{str(path)!r} is not a file") from None
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


def _split_lines(data: bytes) -> tuple[list[str], bool]:
    """(lines, whether the last one is cut: no newline after it). NUL bytes at the end are the
    zero-filled tail a node crash leaves (the size was recorded, the data never written): a cut."""
    text = data.rstrip(b"\0").decode("utf-8", errors="replace")
    if not text:
        return [], False
    cut = not text.endswith("\n")
    return text.splitlines(), cut


# What a line of each JSONL file must hold to be a record of it: key -> its type, or the values
# it may take. A line that parses but lacks them ([1, 2], {"kind": "rolling"}) is damage, found
# here once instead of as a KeyError in each reader.
CHECKPOINT_KINDS = ("rolling", "science", "final")
RECORD_KEYS: dict[str, dict[str, type | tuple]] = {
    METRICS: {"step": int},
    INDEX: {"step": int, "kind": CHECKPOINT_KINDS, "path": str},
    AVERAGES: {"step": int, "last": int},
}


def _not_a_record(row: Any, required: Mapping[str, type | tuple]) -> str | None:
    """What keeps a parsed line from being a record (None when it is one)."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    for key, kind in required.items():
        value = row.get(key)
        if isinstance(kind, tuple):
            if value not in kind:
                return f"an object whose {key!r} is {value!r}, not one of {', '.join(map(str, kind))}"
        elif not isinstance(value, kind) or isinstance(value, bool):
            return f"an object whose {key!r} is {value!r}, not a {kind.__name__}"
    return None


def read_jsonl(path: Path, required: Mapping[str, type | tuple] | None = None) -> list[dict[str, Any]]:
    """Every line of a JSONL file, each a record: an object with the `required` keys. Only a
    last line cut by a kill mid-write is skipped; any other line that does not parse, or is not
    a record, is an error naming the file and the line."""
    path = Path(path)
    raw_bytes = _read_all(path)
    if raw_bytes is None:
        return []
    lines, cut = _split_lines(raw_bytes)
    rows: list[dict[str, Any]] = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        problem: str | None
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            row, problem = None, "not valid JSON"
        else:
            problem = _not_a_record(row, required or {})
        if problem is None:
            rows.append(row)
            continue
        if number == len(lines) and cut and not isinstance(row, dict):
            break  # the write a kill interrupted: the next append drops it (_drop_cut_tail)
        raise TestbedError(f"{path} line {number} is {problem} ({raw[:60]!r}); it was damaged after being "
                           f"written: repair or delete that line")
    return rows


def _drop_cut_tail(fd: int, size: int) -> int:
    """Truncate a JSONL file after its last newline, so the next line starts on its own; a last
    line that is a whole record (read_jsonl returns it) keeps it, with its newline restored.
    Returns the new size."""
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    data = os.pread(fd, size, 0).rstrip(b"\0")  # rare: a kill cut the last append, or a crash left zeros
    start = data.rfind(b"\n") + 1
    try:  # a whole record that lost only its newline (or only zeros follow it) is kept
        complete = isinstance(json.loads(data[start:].decode("utf-8")), dict)
    except ValueError:
        complete = False
    os.ftruncate(fd, len(data) if complete else start)
    if complete:
        _write_all(fd, b"\n")
        return len(data) + 1
    return start


def append_text(path: Path, text: str, fsync: bool = False, lines: bool = False) -> None:
    """Append `text` to `path` (created if missing) through _open. A refused write leaves the file
    as it was, no partial line, and is a StorageError; lines=True (JSONL) first drops a cut tail."""
    path = Path(path)
    try:
        fd = _open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    except OSError as err:
        raise storage_error(err, path) from None
    try:
        size = os.fstat(fd).st_size
        try:
            if lines:
                size = _drop_cut_tail(fd, size)
            _write_all(fd, text.encode("utf-8"))
            if fsync:
                os.fsync(fd)
        except OSError as err:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass  # a read-only file system wrote nothing anyway
            raise storage_error(err, path) from None
    finally:
        os.close(fd)


def append_jsonl(path: Path, record: dict[str, Any], fsync: bool = False) -> None:
    append_text(path, to_json(record) + "\n", fsync=fsync, lines=True)


def write_jsonl_atomic(path: Path, records: list[dict[str, Any]], links: str = "replace") -> None:
    write_text_atomic(path, "".join(to_json(r) + "\n" for r in records), links=links)


# ----------------------------------------------------------------------------- run ids


# Keys that change no number a run computes: the preset's and the depth dial's (their shape is
# filled in), and observers and guards of the loss (the tasks scored beside it included).
UNCOUNTED_KEYS = {"model": ("preset", "depth", "depth_aspect", "depth_head_dim"),
                  "train": ("spike_nats", "divergence_nats", "tasks", "collective_timeout_s")}
# A section dataclass's field with this metadata key set to False (a field added after runs were
# first registered) is left out of the hash while at its default, so the ids of runs that do not
# use it stay as they were; every other field is hashed whatever its value. Adding a field is one
# edit: `field(default=..., metadata={HASH_AT_DEFAULT: False})` in its section's dataclass.
HASH_AT_DEFAULT = "hash_at_default"


def defaults_left_out(section: type) -> dict[str, Any]:
    """The fields of the dataclass `section` that the hash leaves out while at their defaults:
    name -> default (read from the fields' metadata)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        if f.metadata.get(HASH_AT_DEFAULT, True):
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def hash_tree(tree: dict[str, Any], sections: Mapping[str, type]) -> str:
    """A short hash of what a config tree computes: its name, labels, logging and UNCOUNTED_KEYS
    do not count, nor a field of a section's dataclass (`sections`: section name -> its class)
    declared with HASH_AT_DEFAULT False while at its default. testbed.config.config_hash passes
    the config's own dataclasses; this module stays below the config."""
    tree = {k: v for k, v in tree.items() if k not in COSMETIC_KEYS}
    for section, keys in UNCOUNTED_KEYS.items():
        if isinstance(tree.get(section), dict):
            tree[section] = {k: v for k, v in tree[section].items() if k not in keys}
    for section, cls in sections.items():
        if not isinstance(tree.get(section), dict):
            continue
        left_out = defaults_left_out(cls)
        tree[section] = {k: v for k, v in tree[section].items() if k not in left_out or v != left_out[k]}
    canonical = json.dumps(tree, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:HASH_CHARS]


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


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
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
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = _open(self.lock_path, os.O_RDWR | os.O_CREAT)
        except OSError as err:
            raise storage_error(err, self.lock_path) from None
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
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise RunDirBusy(
                        f"run directory {str(self.path)!r} is in use by {describe_holder(holder)}; "
                        f"two trainers must not write one run. Wait for it to finish, or stop it "
                        f"(kill -TERM {holder.get('pid', 'PID')} saves a resume checkpoint) and "
                        f"run this again", holder) from None
                time.sleep(0.05)
        record = to_json({"host": socket.gethostname(), "pid": os.getpid(),
                          "since": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
        try:
            problem = next(filter(None, map(not_a_file, self.files())), None)
            if problem is not None:  # before the run is read or written at all
                raise problem
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        except BaseException as err:
            os.close(fd)
            if isinstance(err, OSError):
                raise storage_error(err, self.lock_path) from None
            raise
        return RunLock(self.lock_path, fd)

    def files(self) -> list[Path]:
        """The files of the run that the testbed writes (beside the lock)."""
        return [self.run_json, self.status_json, self.metrics_path, self.log_path, self.index_path,
                self.averages_path]

    def lock_holder(self) -> dict[str, Any] | None:
        """Who owns the run directory now ({"host", "pid", "since"}, {} when it has not said
        yet), or None when nobody does. Creates nothing: a read-only look."""
        try:
            fd = _open(self.lock_path, os.O_RDONLY)
        except (FileNotFoundError, TestbedError):  # a link or a folder there: nobody can hold it
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return _read_holder(fd)
        finally:
            os.close(fd)
        return None

    # run.json and status.json
    def read_run(self) -> dict[str, Any] | None:
        return read_json(self.run_json)

    def write_run(self, data: dict[str, Any]) -> None:
        write_json_atomic(self.run_json, data, links="refuse")

    def read_status(self) -> dict[str, Any]:
        return read_json(self.status_json) or {}

    def write_status(self, state: str, **fields: Any) -> None:
        """status.json anew; on a disk too full for a new copy, over the old one in its blocks
        (overwrite_in_place), so a run that fails for want of space still says so."""
        if state not in STATES:
            raise ValueError(f"status state {state!r} is not one of {STATES}")
        text = to_json({"state": state, **fields}, indent=1)
        try:
            write_text_atomic(self.status_json, text, links="refuse")
        except StorageError as err:
            try:
                overwrite_in_place(self.status_json, text)
            except (OSError, TestbedError):
                raise err from None

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
        append_text(self.log_path, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    # metrics.jsonl
    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path, RECORD_KEYS[METRICS])

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, record)

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        write_jsonl_atomic(self.metrics_path, records, links="refuse")

    # checkpoints/index.jsonl
    def index(self) -> list[dict[str, Any]]:
        return read_jsonl(self.index_path, RECORD_KEYS[INDEX])

    def append_index(self, line: dict[str, Any]) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.index_path, line, fsync=True)

    def write_index(self, lines: list[dict[str, Any]]) -> None:
        write_jsonl_atomic(self.index_path, lines, links="refuse")

    # averages.jsonl
    def averages(self) -> list[dict[str, Any]]:
        return read_jsonl(self.averages_path, RECORD_KEYS[AVERAGES])

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
