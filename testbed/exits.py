"""The trainer's exit contract, read by every executor (local, fork server, SLURM hook), and
how a process ends with its code (`leave`).

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

import os
import sys
from typing import NoReturn

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


# Set once this process has joined a torch.distributed process group (see `leave`).
_skip_finalization = False


def skip_finalization() -> None:
    """This process ends through `leave` without finalizing the interpreter. A gloo rank that
    has trained correctly and destroyed its group now and then aborted as the interpreter tore
    down (SIGABRT, "terminate called without an active exception", as when a C++ thread is
    never joined; likely the group kept alive until then by DDP's reducer): once in 158 two-process runs
    on a 2-core machine, and once in the test suite. That turns a done run's exit 0 into a crash."""
    global _skip_finalization
    _skip_finalization = True


def leave(code: int) -> int:
    """`code`, returned for the caller to exit with; or, after skip_finalization, the process
    ends here with it."""
    if _skip_finalization:
        end_process(code)
    return code


def end_process(code: int) -> NoReturn:
    """End now with `code`, after what the interpreter does on its way out (wind_down), but
    without tearing the interpreter down."""
    wind_down()
    os._exit(code & 0xFF)  # as the interpreter truncates sys.exit(code)


def wind_down() -> None:
    """What a fresh interpreter does on its way out: wait for non-daemon threads, run atexit
    handlers, flush stdout and stderr (os._exit skips them)."""
    import atexit
    import threading

    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except Exception:
        pass
    try:
        atexit._run_exitfuncs()
    except Exception:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
