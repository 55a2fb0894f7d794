"""Registry updates called from inside a SLURM batch script (light: no torch import).

    python -m testbed.sweep.hook begin SWEEP_DIR RUN_ID JOB      exit DONE: train it; SKIP: already done
    python -m testbed.sweep.hook end   SWEEP_DIR RUN_ID RC JOB   exit DONE, PREEMPTED, BUSY or FAILURE

(the codes are testbed/exits.py's; the batch script is rendered with their values)
"""

from __future__ import annotations

import os
import sys

from testbed import exits
from testbed.rundir import RunDir
from testbed.sweep.outcome import record_exit
from testbed.sweep.registry import Registry, now


def begin(sweep_dir: str, run_id: str, job: str) -> int:
    registry = Registry(sweep_dir)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    previous = registry.read(run_id) or {}
    if (previous.get("state") == "running" and previous.get("job_id") == job
            and previous.get("restart_count", 0) < restart):
        # The attempt before this requeue never reached `end`: SLURM ends the whole job, batch
        # shell included, when it requeues it (after KillWait). Book that attempt's outcome from
        # what its trainer wrote before this one starts.
        status = RunDir(registry.run_dir(run_id)).read_status() or {}
        record_exit(registry, run_id, exits.from_state(status.get("state")), previous.get("status_at_begin"))
    with registry.locked():
        record = registry.read(run_id) or {"run_id": run_id}
        if registry.is_done(run_id):
            registry.set_state(record, "done", None)
            registry.write(record)
            return exits.SKIP
        record["launches"] = record.get("launches", 0) + 1
        stamp = RunDir(registry.run_dir(run_id)).status_stamp()
        registry.set_state(record, "running", None, executor="slurm", job_id=job,
                           started_at=now(), restart_count=restart,
                           node=os.uname().nodename, status_at_begin=list(stamp or ["none"]))
        registry.write(record)
    return exits.DONE


def end(sweep_dir: str, run_id: str, exit_code: int) -> int:
    registry = Registry(sweep_dir)
    record = record_exit(registry, run_id, exit_code, (registry.read(run_id) or {}).get("status_at_begin"))
    if record.get("last_exit_code") == exits.BUSY:
        # Another live process holds the run directory (e.g. the previous attempt still saving
        # after a requeue): the task requeues itself and looks again later.
        return exits.BUSY
    return exits.from_state(record["state"])


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "begin":
        return begin(argv[1], argv[2], argv[3] if len(argv) > 3 else "")
    if len(argv) >= 4 and argv[0] == "end":
        return end(argv[1], argv[2], int(argv[3]))
    print(__doc__, file=sys.stderr)
    return exits.BAD_INPUT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
