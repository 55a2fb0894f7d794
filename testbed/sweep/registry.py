"""The sweep directory's run registry: one JSON record per run, updated under a lock.

    SWEEP_DIR/
      registry.lock           fcntl lock held while records are read-modified-written
      registry/<run_id>.json  the run's state and history (written as tmp + os.replace)
      runs/<run_id>/          the run directory (config.yaml written here, the rest by the trainer)
      logs/<run_id>.log       the trainer's stdout and stderr, appended across attempts
      slurm/                  generated batch scripts and SLURM's own output files

States: pending (known, never started), submitted (handed to SLURM), running, preempted
(stopped with a resume checkpoint; will continue), done, failed (with a reason; retried while
`failures <= max_retries` unless the input itself was bad).

Every claim of a run happens while holding the lock and re-reading the record, so two
submitters of the same sweep (two shells, two `sweep run` invocations) never start it twice.
The run directory's own lock (RUN_DIR/lock, held by its live trainer) has the last word: a run
whose lock is held is running, whatever its record says and whoever started it (a trainer
outliving its executor, a `testbed train` by hand), so it is reported as running and never
claimed; once the lock is free the record is brought in line with status.json again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError
from testbed.rundir import RunDir, describe_holder, read_json, write_json_atomic, write_text_atomic

STATES = ("pending", "submitted", "running", "preempted", "done", "failed")
ACTIVE = ("submitted", "running")
HISTORY_LIMIT = 100


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Registry:
    def __init__(self, sweep_dir: str | Path):
        self.root = Path(sweep_dir).resolve()
        self.records_dir = self.root / "registry"
        self.runs_dir = self.root / "runs"
        self.logs_dir = self.root / "logs"
        self.lock_path = self.root / "registry.lock"

    # ------------------------------------------------------------------ paths

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def config_path(self, run_id: str) -> Path:
        return RunDir(self.run_dir(run_id)).config_yaml

    def log_path(self, run_id: str) -> Path:
        return self.logs_dir / f"{run_id}.log"

    def record_path(self, run_id: str) -> Path:
        return self.records_dir / f"{run_id}.json"

    def exists(self) -> bool:
        return self.records_dir.is_dir()

    # ------------------------------------------------------------------ locking and records

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def read(self, run_id: str) -> dict[str, Any] | None:
        path = self.record_path(run_id)
        return self.read_record_file(path) if path.exists() else None

    def write(self, record: dict[str, Any]) -> None:
        self.records_dir.mkdir(parents=True, exist_ok=True)
        record["updated_at"] = now()
        write_json_atomic(self.record_path(record["run_id"]), record, sort_keys=True)

    def records(self, damaged: list[dict[str, str]] | None = None) -> list[dict[str, Any]]:
        """Every record, in sweep order. A record that cannot be read is an error naming the
        file and the fix; with `damaged` given, it is listed there ({"path", "run_id",
        "message"}) and left out instead (sweep status shows it as a row of its own)."""
        if not self.records_dir.is_dir():
            return []
        out = []
        for path in sorted(self.records_dir.glob("*.json")):
            try:
                out.append(self.read_record_file(path))
            except TestbedError as err:
                if damaged is None:
                    raise
                damaged.append({"path": str(path), "run_id": path.stem, "message": str(err)})
        return sorted(out, key=lambda r: (r.get("order", 0), r["run_id"]))

    def read_record_file(self, path: Path) -> dict[str, Any]:
        fix = (f"delete {str(path)!r} and run `testbed sweep run SWEEP_FILE --sweep-dir "
               f"{str(self.root)!r}` again: the run is registered anew and its run directory "
               f"(kept as it is) resumed or recognised as done")
        try:
            record = read_json(path)
        except TestbedError as err:
            reason = str(err).split(";")[0]
            raise TestbedError(f"registry record {reason}: it was damaged; {fix}") from None
        problem = None
        if not isinstance(record, dict):
            problem = f"holds {type(record).__name__} instead of a record"
        elif record.get("run_id") != path.stem:
            problem = f"names run {record.get('run_id')!r}, not {path.stem!r}"
        elif record.get("state") not in STATES:
            problem = f"has state {record.get('state')!r}, not one of {', '.join(STATES)}"
        if problem or not isinstance(record, dict):  # (not a dict: problem says so)
            raise TestbedError(f"registry record {str(path)!r} {problem}: it was damaged; {fix}")
        return record

    def set_state(self, record: dict[str, Any], state: str, reason: str | None = None,
                  **fields: Any) -> dict[str, Any]:
        """Change a record's state in memory (the caller writes it, holding the lock)."""
        assert state in STATES, state
        record.update(fields)
        if state != record.get("state") or reason != record.get("reason"):
            record.setdefault("history", []).append({"time": now(), "state": state,
                                                     "reason": reason})
            record["history"] = record["history"][-HISTORY_LIMIT:]
        record["state"] = state
        record["reason"] = reason
        return record

    def update(self, run_id: str, state: str, reason: str | None = None,
               **fields: Any) -> dict[str, Any]:
        with self.locked():
            record = self.read(run_id)
            if record is None:
                raise TestbedError(f"run {run_id!r} is not in the registry of {str(self.root)!r}; "
                                   f"submit the sweep with `testbed sweep run` first")
            self.set_state(record, state, reason, **fields)
            self.write(record)
            return record

    # ------------------------------------------------------------------ adding a sweep

    def add_runs(self, sweep: Any) -> list[str]:
        """Record every run of `sweep` not yet known; returns the sweep's run ids in order.

        A run whose config hash is already registered keeps its existing id (its label slug
        may have changed when axes were added), so it is never trained a second time.
        """
        import yaml

        with self.locked():
            records = self.records()
            by_hash = {r["config_hash"]: r for r in records}
            rehashed = False
            order = len(records)
            ids = []
            for run in sweep.runs:
                if run.config_hash not in by_hash and not rehashed:
                    # A run registered by an older version carries that version's hash: its saved
                    # config, hashed as today, still finds it, so an upgrade never trains a
                    # registered run again. Read only when a planned run is not found.
                    for record in records:
                        by_hash.setdefault(self.current_hash(record["run_id"]) or record["config_hash"], record)
                    rehashed = True
                known = by_hash.get(run.config_hash)
                if known is not None:
                    if run.run_id != known["run_id"]:
                        run.run_id = known["run_id"]
                        run.config.name = f"{sweep.name}/{run.run_id}"
                    ids.append(run.run_id)
                    continue
                run_dir = self.run_dir(run.run_id)
                run_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.config_path(run.run_id),
                                  yaml.safe_dump(run.config.to_dict(), sort_keys=False))
                record = {"run_id": run.run_id, "config_hash": run.config_hash,
                          "sweep": sweep.name, "labels": run.labels, "order": order,
                          "quantities": run.quantities, "failures": 0, "preemptions": 0,
                          "launches": 0, "retryable": True, "created_at": now()}
                self.set_state(record, "pending")
                self.write(record)
                order += 1
                ids.append(run.run_id)
            return ids

    def current_hash(self, run_id: str) -> str | None:
        """The hash of a registered run's saved config.yaml under today's config rules."""
        from testbed.config import read_yaml, saved_config
        from testbed.sweep.spec import hash_config

        path = self.config_path(run_id)
        if not path.is_file():
            return None
        try:
            return hash_config(saved_config(read_yaml(path)))
        except TestbedError:
            return None  # a config this version no longer reads: matched by its old hash only

    def claim(self, run_ids: list[str], max_retries: int, executor: str,
              **fields: Any) -> dict[str, Any] | None:
        """Mark the first startable run of `run_ids` as running by this process; None if none.

        The record is re-read under the lock, so concurrent executors never claim the same run.
        """
        host = socket.gethostname()
        with self.locked():
            for run_id in run_ids:
                record = self.read(run_id)
                if record is None:
                    continue
                if self._reconcile_one(record, None, host):
                    self.write(record)
                if not eligible(record, max_retries):
                    continue
                record["launches"] = record.get("launches", 0) + 1
                self.set_state(record, "running", None, executor=executor, started_at=now(),
                               owner={"host": host, "pid": os.getpid()}, **fields)
                self.write(record)
                return record
        return None

    # ------------------------------------------------------------------ reading run directories

    def run_status(self, run_id: str) -> dict[str, Any]:
        return RunDir(self.run_dir(run_id)).read_status()

    def is_done(self, run_id: str) -> bool:
        status = self.run_status(run_id)
        return bool(status and status.get("state") == "done")

    def reconcile(self, live_jobs: Any = None,
                  damaged: list[dict[str, str]] | None = None) -> list[dict[str, Any]]:
        """Bring records in line with the run directories and with what is still alive.

        `live_jobs`: a callable returning the SLURM job ids (`ARRAY_TASK` form) still queued
        or running, called while the lock is held so that no submission can slip between the
        query and the update; a submitted run whose job is gone unfinished is marked failed.
        `damaged`: see records().
        """
        with self.locked():
            return self.reconcile_locked(live_jobs() if callable(live_jobs) else live_jobs,
                                         damaged)

    def reconcile_locked(self, live_jobs: set[str] | None,
                         damaged: list[dict[str, str]] | None = None) -> list[dict[str, Any]]:
        host = socket.gethostname()
        records = self.records(damaged)
        for record in records:
            if self._reconcile_one(record, live_jobs, host):
                self.write(record)
        return records

    def lock_holder(self, run_id: str) -> dict[str, Any] | None:
        """The live process owning the run's directory ({"host", "pid", ...}), or None."""
        return RunDir(self.run_dir(run_id)).lock_holder()

    def adopt(self, record: dict[str, Any], holder: dict[str, Any]) -> None:
        """Record a run as running in the process that holds its run directory's lock."""
        owner = {"host": holder.get("host"), "pid": holder.get("pid"), "lock": True}
        self.set_state(record, "running", f"trained by {describe_holder(holder)}, which holds "
                       "its run directory; not started again", owner=owner)

    def _reconcile_one(self, record: dict[str, Any], live_jobs: set[str] | None,
                       host: str) -> bool:
        state = record.get("state")
        holder = self.lock_holder(record["run_id"])
        if holder is not None:
            # A live trainer owns the run: it is running, whatever the record said (its
            # executor may have died, or it was started by hand).
            if state == "done" or (state in ACTIVE and not self._owner_gone(record, host)):
                return False
            self.adopt(record, holder)
            return True
        status = self.run_status(record["run_id"]) or {}
        if status.get("state") == "done":
            if state != "done":
                self.set_state(record, "done", None, finished_at=record.get("finished_at") or now())
                return True
            return False
        if state not in ACTIVE:
            return False
        if (record.get("owner") or {}).get("lock"):
            # The process it was adopted from has let go of the run directory.
            self.set_state(record, "preempted", "the process that held its run directory "
                           "ended; it resumes on the next `testbed sweep run`")
            return True
        if record.get("executor") == "local":
            if self._owner_gone(record, host):
                self.set_state(record, "preempted", "the local executor that ran it stopped; "
                               "it resumes on the next `testbed sweep run`")
                return True
            return False
        job = record.get("job_id")
        if live_jobs is not None and job and job not in live_jobs:
            if status.get("state") == "preempted":
                self.set_state(record, "preempted", "its SLURM job ended after saving a resume "
                               "checkpoint; it resumes on the next `testbed sweep run`")
            else:
                record["failures"] = record.get("failures", 0) + 1
                self.set_state(record, "failed", f"SLURM job {job} ended without finishing the "
                               f"run (time limit, memory or node failure); see the log")
            return True
        return False

    @staticmethod
    def _owner_gone(record: dict[str, Any], host: str) -> bool:
        """A local run whose owning process (on this host) is no longer alive."""
        owner = record.get("owner") or {}
        pid = owner.get("pid")
        return (record.get("executor") == "local" and owner.get("host") == host
                and bool(pid and not process_alive(pid)))


def eligible(record: dict[str, Any], max_retries: int,
             live_jobs: set[str] | None = None) -> bool:
    """Whether a run should be started (again) now.

    A run whose SLURM job is still queued or running (e.g. preempted and requeued by SLURM) is
    left to that job.
    """
    state = record.get("state")
    if live_jobs is not None and record.get("job_id") in live_jobs:
        return False
    if state in ("pending", "preempted"):
        return True
    if state == "failed":
        return bool(record.get("retryable", True)) and record.get("failures", 0) <= max_retries
    return False
