"""The trainer's exit contract, read by every executor (local, fork server, SLURM hook).

    0   DONE        the run is done (status.json says "done")
    1   FAILURE     anything else went wrong: worth retrying within the sweep's limit
    2   BAD_INPUT   the config or data is wrong (a TestbedError): retrying cannot help
    75  PREEMPTED   stopped by something outside the run (EX_TEMPFAIL): run it again. A resume
                    checkpoint was saved on SIGTERM/SIGUSR1; or a peer rank was lost (status.json
                    says lost_peer) and it resumes from its last checkpoint
    73  BUSY        another live process owns the run directory (its lock, RunDir.acquire): this
                    trainer touched nothing; not a failure, and starting it again now would only
                    collide again (the run is running elsewhere)
    3   SKIP        (SLURM hook only) the run is already done: the batch task moves on
    70  NOT_STARTED (fork server only) a child whose server died before announcing it: it did
                    nothing
"""

from __future__ import annotations

DONE = 0
FAILURE = 1
BAD_INPUT = 2
SKIP = 3
PREEMPTED = 75
BUSY = 73
NOT_STARTED = 70

# The code a run's recorded state stands for, where the process's own status is lost (a
# forked trainer whose server died, a torchrun rank): "failed" loses bad input vs failure.
_BY_STATE = {"done": DONE, "preempted": PREEMPTED}


def from_state(state: str | None) -> int:
    return _BY_STATE.get(state or "", FAILURE)
