"""Turning a trainer's exit status into a registry state (shared by every executor).

The trainer's exit contract is testbed/exits.py.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

from testbed import exits
from testbed.sweep.registry import Registry, now


def tail(path: Path, lines: int = 10) -> list[str]:
    try:
        with open(path, errors="replace") as handle:
            return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]
    except FileNotFoundError:
        return []


def record_exit(registry: Registry, run_id: str, exit_code: int) -> dict[str, Any]:
    """Store the outcome of one trainer process; returns the updated record."""
    status = registry.run_status(run_id)
    holder = registry.lock_holder(run_id)
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
        if exit_code == exits.BUSY and holder is not None:
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
