"""Turning a trainer's exit status into a registry state (shared by every executor).

The trainer's exit contract is testbed/exits.py.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

from testbed import exits
from testbed.rundir import RunDir
from testbed.sweep.registry import Registry, now

# A run whose processes are lost (killed without a word, or a peer rank gone) is started again
# from its last checkpoint this many times; after that it fails: something in it kills them.
MAX_LOST = 3


def tail(path: Path, lines: int = 10) -> list[str]:
    try:
        with open(path, errors="replace") as handle:
            return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]
    except FileNotFoundError:
        return []


def record_exit(registry: Registry, run_id: str, exit_code: int,
                status_before: Any = None) -> dict[str, Any]:
    """Store the outcome of one trainer process; returns the updated record.

    status_before: the stamp of status.json when the trainer started (RunDir.status_stamp, as a
    list; "none" when there was none), where the caller knows it: a status.json this trainer did
    not write is an earlier attempt's word and says nothing about this one."""
    run = RunDir(registry.run_dir(run_id))
    status = run.read_status() or {}
    if status_before is not None and list(run.status_stamp() or ["none"]) == list(status_before):
        status = {}
    holder = registry.lock_holder(run_id)
    # Lost: rank 0 said a peer rank died or hung (lost_peer), or the trainer died without a word
    # (status still "running", its lock let go: SIGKILL, the out-of-memory killer, a lost node).
    lost = exit_code not in (exits.DONE, exits.BAD_INPUT, exits.BUSY) and holder is None and (
        bool(status.get("lost_peer")) or (status.get("state") == "running" and exit_code != exits.PREEMPTED))
    # Under torchrun the exit status of a preempted rank is not passed through unchanged, so
    # the run directory's own word counts as well; and a trainer that failed while another
    # process holds the run directory was turned away by it (torchrun reports BUSY as 1).
    if exit_code not in (exits.DONE, exits.PREEMPTED, exits.BUSY) and holder is not None:
        exit_code = exits.BUSY
    elif exit_code not in (exits.DONE, exits.PREEMPTED) and status.get("state") == "preempted":
        exit_code = exits.PREEMPTED
    with registry.locked():
        record = registry.read(run_id) or {"run_id": run_id}
        record["last_exit_code"] = exit_code
        if lost:
            record["lost"] = record.get("lost", 0) + 1
            if record["lost"] <= MAX_LOST:
                exit_code = record["last_exit_code"] = exits.PREEMPTED
                what = status.get("message") if status.get("lost_peer") else (
                    f"a process was killed without a word at step {status.get('step', '?')} (out of memory? "
                    f"a lost node?); it resumes from its last checkpoint")
                registry.set_state(record, "preempted", f"{what} (restart {record['lost']} of at most {MAX_LOST})")
            else:
                record["failures"] = record.get("failures", 0) + 1
                registry.set_state(record, "failed", f"its processes were lost {record['lost']} times "
                                   f"(last at step {status.get('step', '?')}); see {registry.log_path(run_id)}")
        elif exit_code == exits.BUSY and holder is not None:
            # Not a failure and not to be started again now: the run trains elsewhere (a
            # trainer that outlived its executor, a double launch). Whoever holds it runs it.
            registry.adopt(record, holder)
        elif exit_code == exits.BUSY:
            # The holder let go meanwhile: startable again (done runs are recognised as such).
            registry.set_state(record, "preempted", "another process held its run directory "
                               "and has since let go of it")
        elif exit_code == exits.DONE and status.get("state") == "done":
            registry.set_state(record, "done", None, finished_at=now())
        elif exit_code == exits.DONE:
            record["failures"] = record.get("failures", 0) + 1
            registry.set_state(record, "failed", "the trainer exited 0 but status.json does not "
                               f"say done (it says {status.get('state')!r})")
        elif exit_code == exits.PREEMPTED:
            record["preemptions"] = record.get("preemptions", 0) + 1
            registry.set_state(record, "preempted", "stopped after saving a resume checkpoint")
        elif exit_code == exits.BAD_INPUT:
            last = next((l for l in reversed(tail(registry.log_path(run_id), 20)) if l.strip()), "")
            registry.set_state(record, "failed", f"bad input (exit {exits.BAD_INPUT}), not retried: {last}",
                               retryable=False)
        else:
            record["failures"] = record.get("failures", 0) + 1
            registry.set_state(record, "failed", f"the trainer exited with status {exit_code}; "
                               f"see {registry.log_path(run_id)}")
        registry.write(record)
        return record
