"""Registry updates called from inside a SLURM batch script (light: no torch import).

    python -m testbed.sweep.hook begin SWEEP_DIR RUN_ID JOB      exit DONE: train it; SKIP: already done
    python -m testbed.sweep.hook end   SWEEP_DIR RUN_ID RC JOB   exit DONE, PREEMPTED, BUSY or FAILURE

(the codes are testbed/exits.py's; the batch script is rendered with their values)
"""

from __future__ import annotations

import os
import sys

from testbed import exits
from testbed.sweep.outcome import record_exit
from testbed.sweep.registry import Registry, now


def begin(sweep_dir: str, run_id: str, job: str) -> int:
    registry = Registry(sweep_dir)
    with registry.locked():
        record = registry.read(run_id) or {"run_id": run_id}
        if registry.is_done(run_id):
            registry.set_state(record, "done", None)
            registry.write(record)
            return exits.SKIP
        record["launches"] = record.get("launches", 0) + 1
        registry.set_state(record, "running", None, executor="slurm", job_id=job,
                           started_at=now(), restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                           node=os.uname().nodename)
        registry.write(record)
    return exits.DONE


def end(sweep_dir: str, run_id: str, exit_code: int) -> int:
    record = record_exit(Registry(sweep_dir), run_id, exit_code)
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
