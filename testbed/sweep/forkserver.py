"""A warm process that forks trainers, so that a sweep of short runs does not pay for start-up.

A fresh `python -m testbed train` spends seconds before its first step: the interpreter, torch
and the lazy `torch._dynamo` import the first optimiser triggers, scipy, wandb. For runs of a
few seconds to a minute that is a large share of a sweep. The local executor therefore starts
one fork server per CPU slot (`python -m testbed.sweep.forkserver`). The server *imports* those
modules once and nothing else: it runs no torch op, so no OpenMP pool, CUDA context or other
state that does not survive fork exists when it forks. For each request it forks a child that
becomes what a fresh trainer process would have been: its own session, the requested
environment and working directory, stdout and stderr appended to the run's log, stdin from
/dev/null, `testbed.cli.main(argv)`, and the exit status a fresh interpreter would give (an
uncaught exception prints its traceback and exits 1; SystemExit codes are respected). Every run
is a new fork of the same import-only state, so nothing one run does (RNG draws, registrations
by `imports:` plugins, signal handlers) can reach the next.

Protocol, one JSON object a line. Server to executor: {"event": "ready", "pid": P} once the
imports are done; {"event": "started", "pid": C} as soon as a child is forked;
{"event": "exit", "pid": C, "code": N} when it ends (N < 0: killed by signal -N, as
subprocess reports it); {"event": "error", "message": M} when a fork failed. Executor to server: {"op": "run", "argv": [...], "log": PATH,
"env": {...}, "cwd": DIR}. A child is not reaped until the executor's next request, so its pid
cannot be reused while the executor may still signal it. A child waits until its "started"
line is written before it does anything: if the server dies before the executor learns the
pid, the child exits untouched and the executor can safely start the run elsewhere. End of
input stops the server. The executor ends its input only once its children have exited, so a
child still running then has lost its executor (killed, even by SIGKILL): the server sends it
SIGTERM, and it saves a resume checkpoint and exits PREEMPTED instead of training on unwatched
beside the executor's next start. (A child is not tied to the server's own life: if the server
dies, the executor still waits for the child, and reads its outcome from status.json.)

This module imports only the standard library at the top: the executor imports the client
half (`ForkServer`) without paying for torch.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from testbed import exits

# Imported once by the server, before any fork: everything a CPU training run imports lazily
# that costs noticeable time. Import only; nothing here may run a torch op at import.
PRELOAD = (
    "torch",
    "torch._dynamo",  # imported by the first torch.optim optimiser: ~2 s a run otherwise
    "numpy",
    "testbed.cli",
    "testbed.train.cli",
    "testbed.data.cli",
    "testbed.sweep.cli",
    "testbed.fit.cli",
    "testbed.config",
    "testbed.train.trainer",
    "testbed.data.synthetic",
    "testbed.data.sources",
    "safetensors.torch",
)
# Present only in some installations; a trainer without them behaves as a fresh process would.
OPTIONAL_PRELOAD = ("wandb", "tqdm.auto")



class ServerGone(Exception):
    """The fork server exited or answered nonsense."""


# ----------------------------------------------------------------------------- executor side


def pidfd_open(pid: int) -> int | None:
    """A pidfd refers to one process for its whole life, so signalling through it can never hit
    a recycled pid. None where the kernel or Python lacks it (pids are used then)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


class ForkedChild:
    """A trainer forked by a fork server: signalled and waited for like a subprocess.Popen."""

    def __init__(self, pid: int):
        self.pid = pid
        self.pidfd = pidfd_open(pid)

    def send_signal(self, sig: int) -> None:
        if self.pidfd is not None:
            signal.pidfd_send_signal(self.pidfd, sig)
        else:
            os.kill(self.pid, sig)

    def wait_gone(self, poll_s: float = 0.2) -> None:
        """Block until the process has ended. Used when its server (the parent that would
        report its exit status) is gone, so the status itself is lost."""
        if self.pidfd is not None:
            select.select([self.pidfd], [], [])  # readable once the process has exited
            return
        while True:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            try:  # an exited child nobody reaped yet (a zombie) has ended too
                if Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    return
            except (OSError, IndexError):
                pass
            time.sleep(poll_s)

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class ForkServer:
    """The executor's handle on one fork server process (one slot, one child at a time).

    env and cwd are fixed when the server starts: they are what its imports saw, so a run whose
    environment or working directory differs must not be forked from it (see `fits`)."""

    def __init__(self, env: dict[str, str], *, stderr: Any = None, command: list[str] | None = None):
        self.env = dict(env)
        self.cwd = os.getcwd()
        # Its own session: Ctrl-C at the terminal reaches the executor, which decides what
        # the trainers are told; the server itself must not die of it.
        self.proc = subprocess.Popen(command or [sys.executable, "-m", "testbed.sweep.forkserver"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                     env=self.env, start_new_session=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both PIPE above
        self.requests: IO[bytes] = self.proc.stdin  # run requests, one JSON line each
        self.replies: IO[bytes] = self.proc.stdout  # events (ready, started, exit, error), one a line
        self.pid = self.proc.pid
        self.ready = False
        self.exits: dict[int, int] = {}

    def fits(self, env: dict[str, str], cwd: str) -> bool:
        return env == self.env and cwd == self.cwd

    def _read(self) -> dict:
        line = self.replies.readline()
        if not line:
            raise ServerGone(f"fork server {self.pid} exited")
        try:
            message = json.loads(line)
        except ValueError:
            raise ServerGone(f"fork server {self.pid} wrote {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise ServerGone(f"fork server {self.pid} wrote {line[:200]!r}")
        if message.get("event") == "exit":
            self.exits[int(message["pid"])] = int(message["code"])
        return message

    def wait_ready(self) -> None:
        """Wait for the server's imports to finish (seconds, once)."""
        while not self.ready:
            self.ready = self._read().get("event") == "ready"

    def start(self, argv: list[str], log_path: str | Path, env: dict[str, str] | None = None,
              cwd: str | None = None) -> ForkedChild:
        """Fork `testbed.cli.main(argv)` with output appended to log_path; returns the child
        at once. ServerGone means no child was started (or one that exits untouched)."""
        self.wait_ready()
        request = {"op": "run", "argv": list(argv), "log": str(log_path),
                   "env": dict(self.env if env is None else env), "cwd": cwd or self.cwd}
        try:
            self.requests.write((json.dumps(request) + "\n").encode())
            self.requests.flush()
        except (BrokenPipeError, OSError) as err:
            raise ServerGone(f"fork server {self.pid} does not read its requests ({err})") from None
        while True:
            message = self._read()
            if message.get("event") == "started":
                return ForkedChild(int(message["pid"]))
            if message.get("event") == "error":
                raise ServerGone(f"fork server {self.pid} could not fork: {message.get('message')}")

    def wait(self, child: ForkedChild) -> int:
        """The child's exit status (negative: killed by that signal). ServerGone: the server died
        meanwhile and the status is lost; the child may still be running."""
        while child.pid not in self.exits:
            self._read()
        return self.exits.pop(child.pid)

    def close(self, timeout: float = 10.0) -> None:
        """End of input stops the server (children still running carry on)."""
        try:
            self.requests.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.replies.close()


# ----------------------------------------------------------------------------- server side


def _write(fd: int, message: dict) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def _exit_code(pid: int) -> int | None:
    """The exit status of child `pid` if it has ended, without reaping it (see the protocol)."""
    result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if result is None or result.si_pid == 0:
        return None
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return -result.si_status  # killed or dumped core: as subprocess.Popen.returncode says


def _system_exit_code(err: SystemExit) -> int:
    """What the interpreter does with an uncaught SystemExit."""
    code = err.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


def _run_child(request: dict) -> int:
    """In the forked child: become a fresh trainer process and run it. Returns the exit code."""
    os.setsid()  # as start_new_session: Ctrl-C reaches it through the executor only
    os.chdir(request["cwd"])
    # The environment the run asked for, exactly (os.environ also updates the C environment
    # that native libraries read).
    os.environ.clear()
    os.environ.update(request["env"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    # A fresh interpreter's dispositions (the server keeps Python's, but be sure of them).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    import torch

    # torch sizes its thread pool from OMP_NUM_THREADS when it first needs it; set it
    # explicitly so the pool matches the slot even if an import had already asked.
    threads = request["env"].get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    # Python's `random` reseeds itself after fork; numpy's legacy global generator does not,
    # and every fresh process would have drawn its own seed.
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()
    import testbed

    sys.argv = [str(Path(testbed.__file__).with_name("__main__.py")), *request["argv"]]
    from testbed.cli import main

    try:
        code = main(list(request["argv"]))
        code = 0 if code is None else code
    except SystemExit as err:
        code = _system_exit_code(err)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    exits.wind_down()  # the child ends with os._exit, so that it never returns into the server's loop
    return code if isinstance(code, int) else 1


def _child(request: dict, gate: int, inherited: list[int]) -> None:
    code = 1
    try:
        for fd in inherited:  # the server's channel and other children's pidfds
            os.close(fd)
        # Run only once the executor has been told this pid (see the protocol).
        released = os.read(gate, 1)
        os.close(gate)
        if not released:
            code = exits.NOT_STARTED
        else:
            code = _run_child(request)
    except BaseException:
        try:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:
            pass
        code = 1
    finally:
        os._exit(code & 0xFF)  # as the interpreter truncates sys.exit(code)


def _orphaned(running: dict[int, int | None]) -> None:
    """The executor has gone while these children run: ask each to save and stop."""
    for pid, pidfd in running.items():
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            else:
                os.kill(pid, signal.SIGTERM)  # not reaped yet, so the pid is still this child's
        except OSError:
            pass


def serve(requests: int, replies: int) -> int:
    running: dict[int, int | None] = {}  # child pid -> its pidfd (None: poll instead)
    unreaped: list[int] = []
    pending = b""
    while True:
        waits = [fd for fd in running.values() if fd is not None]
        timeout = 0.05 if any(fd is None for fd in running.values()) else None
        readable, _, _ = select.select([requests, *waits], [], [], timeout)
        for pid in list(running):
            code = _exit_code(pid)
            if code is not None:
                fd = running.pop(pid)
                if fd is not None:
                    os.close(fd)
                unreaped.append(pid)
                _write(replies, {"event": "exit", "pid": pid, "code": code})
        if requests not in readable:
            continue
        data = os.read(requests, 1 << 16)
        if not data:
            _orphaned(running)
            return 0
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if not line.strip():
                continue
            request = json.loads(line)
            # The executor sends a request only after reading the exit of its previous run (one
            # run at a time per server), so the pids reported so far may go now.
            for pid in unreaped:
                os.waitpid(pid, 0)
            unreaped.clear()
            if request.get("op") != "run":
                _write(replies, {"event": "error", "message": f"unknown request {request!r}"})
                continue
            gate_r, gate_w = os.pipe()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()  # or the child would write the server's buffered text again
            try:
                pid = os.fork()
            except OSError as err:
                os.close(gate_r)
                os.close(gate_w)
                _write(replies, {"event": "error", "message": str(err)})
                continue
            if pid == 0:
                inherited = [requests, replies, gate_w,
                             *(fd for fd in running.values() if fd is not None)]
                _child(request, gate_r, inherited)  # never returns
            os.close(gate_r)
            running[pid] = pidfd_open(pid)
            try:
                _write(replies, {"event": "started", "pid": pid})
                os.write(gate_w, b"g")
            finally:
                os.close(gate_w)


def main() -> int:
    # Keep the protocol's channels apart from fds 0 and 1, and point those at /dev/null and
    # stderr: nothing an imported library prints can corrupt a reply, and a child starts with
    # nothing of the channel once it has redirected its own standard streams.
    requests, replies = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for name in OPTIONAL_PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # a broken optional package fails in the run, as it would fresh
            pass
    _write(replies, {"event": "ready", "pid": os.getpid()})
    try:
        return serve(requests, replies)
    except BrokenPipeError:  # the executor has gone: nobody left to report to
        return 0


if __name__ == "__main__":
    sys.exit(main())
