"""Run a sweep on this machine: one run after another, or several at once.

Each worker slot claims the next startable run from the registry (under its lock), runs the
trainer as a subprocess with output appended to SWEEP_DIR/logs/<run_id>.log, and records the
exit status. A run that exits PREEMPTED (75, testbed/exits.py) is simply started again and resumes from its
checkpoint; a failed run is retried until it has failed `max_retries + 1` times.

Slots: `workers` CPU processes (each limited to its share of the cores), or `runs_per_gpu` per
GPU with CUDA_VISIBLE_DEVICES set to that GPU. Several slots on one GPU are separate trainer
processes (their own data, seeds and CUDA context; results as if each ran alone), each told its
share of the GPU's memory in TESTBED_GPU_MEMORY_FRACTION (testbed/train/device.py applies it) and
of the cores in OMP_NUM_THREADS; slots take the GPUs in turn (0, 1, 0, 1, ...). Ctrl-C, SIGTERM
or SIGHUP (the terminal or ssh session closed) asks every trainer to save and stop (they exit
PREEMPTED and stay resumable); nothing is lost.

Trainers die with their executor: a fresh process gets PR_SET_PDEATHSIG=SIGTERM (Linux), and a
fork server sends SIGTERM to its running child when its executor goes (end of its input); so
even a SIGKILLed `sweep run` leaves no trainer behind, only resume checkpoints. A run whose
directory is still held by a live trainer (RUN_DIR/lock: one saving after such a kill, or one
started by hand) is never started again beside it: it is left to that process, waited for, and
taken up again if it stopped unfinished; a trainer turned away by such a lock exits BUSY.

On CPU slots each trainer is forked from a per-slot fork server (testbed/sweep/forkserver.py)
that has imported torch once, instead of starting a fresh interpreter: seconds saved per run,
same output. If a server dies, its slot goes on with fresh processes. GPU slots and custom
trainer commands always use fresh processes; `fork_server=False` (`--no-fork-server`) makes
every slot do so. A caller that runs several sweeps one after another (a study) passes one
ForkServers to each executor, so each slot imports torch once, not once per sweep.

Each trainer gets WANDB_RUN_GROUP set to the sweep's name (unless the executor's own environment
sets it), so its wandb run lands in the sweep's group. Fork servers are matched without the
wandb run keys (RUN_KEYS): runs of different sweeps or study arms share one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from testbed import exits
from testbed.errors import TestbedError
from testbed.rundir import RunDir, read_json
from testbed.sweep.forkserver import ForkedChild, ForkServer, ServerGone
from testbed.sweep.outcome import record_exit
from testbed.sweep.registry import Registry

# A run preempted again and again without us asking is more likely a loop than a machine
# being shared; stop re-running it after this many preemptions in one invocation.
MAX_PREEMPTIONS_PER_INVOCATION = 50
# How often a slot with nothing to start looks again at runs held by other processes.
HELD_POLL_S = 0.5
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1
# Environment variables naming a trainer's wandb run (testbed/train/metrics.py): set per run,
# so they do not decide which fork server may fork it.
RUN_KEYS = ("WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_NAME")


def _die_with_parent() -> Any:
    """A preexec_fn for Popen: the child gets SIGTERM when the thread that started it ends
    (the executor dies, however). Linux only; elsewhere None (nothing is done). prctl is looked
    up here, in the parent, so the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, sigterm = os.getpid(), int(signal.SIGTERM)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sigterm)
        if os.getppid() != parent:  # the executor died before the call: do not start at all
            os._exit(exits.NOT_STARTED)

    return preexec


def sweep_name(registry: Registry) -> str:
    """The sweep's name (SWEEP_DIR/sweep.json, which `sweep run` and studies write), else the
    folder's name."""
    try:
        name = (read_json(registry.root / "sweep.json") or {}).get("name")
    except (OSError, TestbedError):
        name = None
    return str(name or registry.root.name)


def run_environment(registry: Registry) -> dict[str, str]:
    """What a trainer of this sweep adds to the executor's environment: its wandb group."""
    return {} if os.environ.get("WANDB_RUN_GROUP") else {"WANDB_RUN_GROUP": sweep_name(registry)}


def trainer_command(registry: Registry, run_id: str, trainer: list[str] | None = None) -> list[str]:
    prefix = trainer or [sys.executable, "-m", "testbed", "train"]
    return [*prefix, str(registry.config_path(run_id)), "--run-dir", str(registry.run_dir(run_id))]


def fork_server_usable() -> bool:
    """Forking a process that holds imported torch is safe on Linux; on macOS fork is not (the
    system libraries torch loads may not be used in a forked child)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork") and hasattr(os, "waitid")


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask (what a SLURM allocation, taskset or
    a container's cpuset grants), not every core of the node that os.cpu_count() reports."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity call (macOS)
        return os.cpu_count() or 1


def slot_threads(slots: int) -> int:
    """One slot's share of the usable cores, never more than an OMP_NUM_THREADS the executor
    itself was given (its caller's cap)."""
    threads = max(1, usable_cores() // max(1, slots))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    if cap.isdigit() and int(cap) > 0:
        threads = min(threads, int(cap))
    return threads


def memory_fraction(runs_per_gpu: int) -> str:
    """TESTBED_GPU_MEMORY_FRACTION of one of `runs_per_gpu` runs sharing a GPU: 1/k, written
    with enough digits that k of them never add up to more than the whole."""
    return f"{int(1e6 / runs_per_gpu) / 1e6:.6f}"


def worker_slots(workers: int, gpus: list[str] | None, runs_per_gpu: int = 1) -> list[dict[str, str]]:
    """Environment overrides for each concurrent slot: on the CPU each slot's share of the usable
    cores; with GPUs `runs_per_gpu` slots per GPU, taking the GPUs in turn, and where several
    share one, each with its share of the GPU's memory and of the cores."""
    if gpus:
        k = max(1, runs_per_gpu)
        if k == 1:
            return [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in gpus]
        shared = {"TESTBED_GPU_MEMORY_FRACTION": memory_fraction(k),
                  "OMP_NUM_THREADS": str(slot_threads(k * len(gpus)))}
        return [{"CUDA_VISIBLE_DEVICES": gpu, **shared} for _ in range(k) for gpu in gpus]
    threads = slot_threads(workers)
    return [{"OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
            for _ in range(max(1, workers))]


def gpu_memory_bytes(gpus: list[str]) -> int | None:
    """The memory of the smallest of these GPUs, from nvidia-smi (not from torch: the executor
    holds no CUDA context on the GPUs its trainers share). None where it cannot be read."""
    if not gpus or shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits",
                                 "-i", ",".join(gpus)], capture_output=True, text=True, timeout=30)
        sizes = [int(float(line)) for line in result.stdout.split() if line.strip()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return min(sizes) * 2**20 if result.returncode == 0 and sizes else None  # MiB


class ForkServers(dict[int, "ForkServer | None"]):
    """Each slot's fork server (None: it has gone, the slot uses fresh processes), started on first
    use with its output in LOG_DIR/forkserver.log. An executor makes its own and closes it at its
    end; one passed in by the caller is the caller's to close."""

    def __init__(self, log_dir: Path):
        super().__init__()
        self.log_path = Path(log_dir) / "forkserver.log"

    def close(self) -> None:
        for server in self.values():
            if server is not None:
                server.close()
        self.clear()


class LocalExecutor:
    def __init__(self, registry: Registry, run_ids: list[str], *, workers: int = 1,
                 gpus: list[str] | None = None, max_retries: int = 2, progress: bool = True,
                 trainer: list[str] | None = None, fork_server: bool = True,
                 servers: ForkServers | None = None, runs_per_gpu: int = 1):
        self.registry = registry
        self.run_ids = run_ids
        self.slots = worker_slots(workers, gpus, runs_per_gpu)
        # The fork server runs `testbed train` only, and never holds CUDA: GPU slots and custom
        # trainer commands start fresh processes.
        self.fork_server = fork_server and trainer is None and not gpus and fork_server_usable()
        self.owns_servers = servers is None
        self.servers = servers if servers is not None else ForkServers(registry.logs_dir)
        self.fork_server_command: list[str] | None = None  # another server program (tests)
        self.max_retries = max_retries
        self.progress = progress
        self.trainer = trainer
        self.stopping = threading.Event()
        self.children: dict[int, subprocess.Popen | ForkedChild] = {}  # running trainers, by pid
        self.children_lock = threading.Lock()
        self.preempted_here: dict[str, int] = {}
        self.mine: set[str] = set()  # runs this executor's slots are running now
        self.preexec = _die_with_parent()
        self.bar: Any = None

    def run(self) -> dict[str, int]:
        """Run every startable run; returns the count of runs per final state."""
        self.registry.logs_dir.mkdir(parents=True, exist_ok=True)
        self.registry.reconcile()
        previous = self._install_signal_handlers()
        self._open_progress()
        # No more slots than unfinished runs: a sweep of one run then always lands on slot 0,
        # whose fork server a study keeps warm, instead of a racing idle slot importing torch into
        # a second server.
        unfinished = sum((record or {}).get("state") != "done" for record in map(self.registry.read, self.run_ids))
        threads = [threading.Thread(target=self._slot_loop, args=(slot, env), daemon=True)
                   for slot, env in enumerate(self.slots[:max(1, unfinished)])]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(timeout=0.5)  # short joins keep the main thread responsive to signals
        finally:
            self._restore_signal_handlers(previous)
            if self.owns_servers:
                self.servers.close()
            if self.bar is not None:
                self._refresh_progress()
                self.bar.close()
        return self.counts()

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for run_id in self.run_ids:
            state = (self.registry.read(run_id) or {}).get("state", "pending")
            counts[state] = counts.get(state, 0) + 1
        return counts

    # ------------------------------------------------------------------ worker slots

    def _slot_loop(self, slot: int, env_overrides: dict[str, str]) -> None:
        while not self.stopping.is_set():
            candidates = [r for r in self.run_ids
                          if self.preempted_here.get(r, 0) < MAX_PREEMPTIONS_PER_INVOCATION]
            record = self.registry.claim(candidates, self.max_retries, "local", job_id=None)
            if record is not None:
                with self.children_lock:
                    self.mine.add(record["run_id"])
            else:
                if not self._held_elsewhere(candidates):
                    return
                self.stopping.wait(HELD_POLL_S)  # left to the process that holds it, then resumed
                continue
            run_id = record["run_id"]
            try:
                exit_code = self._run_trainer(run_id, env_overrides, slot)
                outcome = record_exit(self.registry, run_id, exit_code)
            finally:
                with self.children_lock:
                    self.mine.discard(run_id)
            if outcome["state"] == "preempted":
                self.preempted_here[run_id] = self.preempted_here.get(run_id, 0) + 1
            self._refresh_progress()

    def _held_elsewhere(self, run_ids: list[str]) -> bool:
        """Whether a run not yet done is trained by a process outside this executor (its run
        directory's lock is held): the slot waits for it instead of ending the sweep early."""
        with self.children_lock:
            others = [r for r in run_ids if r not in self.mine]
        for run_id in others:
            if self.registry.lock_holder(run_id) is not None and not self.registry.is_done(run_id):
                return True
        return False

    def _run_trainer(self, run_id: str, env_overrides: dict[str, str], slot: int = 0) -> int:
        env = {**os.environ, **env_overrides, **run_environment(self.registry)}
        command = trainer_command(self.registry, run_id, self.trainer)
        server = self._server(slot, {k: v for k, v in env.items() if k not in RUN_KEYS})
        if server is not None:
            exit_code = self._run_forked(server, slot, run_id, command, env)
            if exit_code is not None:
                return exit_code
        return self._run_subprocess(run_id, command, env)

    def _run_subprocess(self, run_id: str, command: list[str], env: dict[str, str]) -> int:
        with open(self.registry.log_path(run_id), "ab") as log:
            log.write(f"\n=== {' '.join(command)}\n".encode())
            log.flush()
            with self.children_lock:
                if self.stopping.is_set():
                    return exits.PREEMPTED  # asked to stop before it started: still resumable
                # Its own session: Ctrl-C and a terminal's SIGHUP reach it through us only; and
                # it gets SIGTERM (saves, exits PREEMPTED) if we die without asking it.
                child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, preexec_fn=self.preexec)
                self.children[child.pid] = child
            try:
                return child.wait()
            finally:
                with self.children_lock:
                    self.children.pop(child.pid, None)

    # ------------------------------------------------------------------ fork servers

    def _server(self, slot: int, env: dict[str, str]) -> ForkServer | None:
        """This slot's fork server (started on first use), or None: use a fresh process."""
        if not self.fork_server:
            return None
        if slot not in self.servers:
            try:
                self.servers.log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.servers.log_path, "ab") as stderr:
                    self.servers[slot] = ForkServer(env, stderr=stderr,
                                                    command=self.fork_server_command)
            except OSError as err:
                print(f"fork server for slot {slot} did not start ({err}); runs start in fresh "
                      "processes", file=sys.stderr)
                self.servers[slot] = None
        server = self.servers[slot]
        # Its imports saw the environment it was started with: a run that asks for another
        # (or another working directory) gets a fresh process instead.
        return server if server is not None and server.fits(env, os.getcwd()) else None

    def _run_forked(self, server: ForkServer, slot: int, run_id: str, command: list[str],
                    env: dict[str, str]) -> int | None:
        """Train the run in a child of the fork server. None: it was not started (the server
        has gone), so the caller starts it in a fresh process; nothing runs twice."""
        argv = ["train", str(self.registry.config_path(run_id)),
                "--run-dir", str(self.registry.run_dir(run_id))]
        log_path = self.registry.log_path(run_id)
        before = RunDir(self.registry.run_dir(run_id)).status_stamp()
        try:
            server.wait_ready()  # outside the lock: the signal handler must not wait on imports
            with self.children_lock:
                if self.stopping.is_set():
                    return exits.PREEMPTED  # asked to stop before it started: still resumable
                with open(log_path, "ab") as log:
                    log.write(f"\n=== {' '.join(command)} (forked by fork server {server.pid})\n"
                              .encode())
                child = server.start(argv, log_path, env, os.getcwd())
                self.children[child.pid] = child
        except ServerGone as err:
            self._server_gone(slot, server, err)
            return None
        try:
            return server.wait(child)
        except ServerGone as err:
            self._server_gone(slot, server, err)
            child.wait_gone()  # the trainer may still be running: never start it twice
            return self._exit_from_status(run_id, before)
        finally:
            with self.children_lock:
                self.children.pop(child.pid, None)
            child.close()

    def _exit_from_status(self, run_id: str, before: tuple[int, int] | None) -> int | None:
        """A forked trainer ended after its server died, so its exit status is lost: read its
        outcome from status.json, which the trainer writes before its first step and at its end.
        Untouched: it never got that far (or never started), and it is started again."""
        run = RunDir(self.registry.run_dir(run_id))
        if run.status_stamp() == before:
            return None
        try:
            state = run.read_status().get("state")
        except (OSError, TestbedError):
            return exits.FAILURE
        # "running" means it was killed; "failed" loses whether it was bad input (exit 2):
        # both count as a failure, retried within the limit like any other.
        return exits.from_state(state)

    def _server_gone(self, slot: int, server: ForkServer, err: Exception) -> None:
        if self.servers.get(slot) is server:
            self.servers[slot] = None
            print(f"{err} (its output: {self.servers.log_path}); slot {slot} "
                  "starts its runs in fresh processes from now on", file=sys.stderr)
        server.close(timeout=5)

    # ------------------------------------------------------------------ stopping

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, self._on_stop_signal)
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self.stopping.set()
        with self.children_lock:
            for child in self.children.values():
                try:
                    child.send_signal(signal.SIGTERM)  # the trainer saves and exits PREEMPTED
                except ProcessLookupError:
                    pass
        try:  # after SIGHUP the terminal may be gone
            print(f"stopping ({signal.Signals(signum).name}): asked every running trainer to save "
                  "a checkpoint and exit", file=sys.stderr)
        except OSError:
            pass

    # ------------------------------------------------------------------ progress display

    def _open_progress(self) -> None:
        if not self.progress:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=len(self.run_ids), unit="run", desc="sweep", file=sys.stderr)
        self._refresh_progress()

    def _refresh_progress(self) -> None:
        if self.bar is None:
            return
        counts = self.counts()
        try:
            self.bar.n = counts.get("done", 0)
            self.bar.set_postfix({k: v for k, v in counts.items() if k != "done"}, refresh=False)
            self.bar.refresh()
        except OSError:  # the terminal has gone (SIGHUP): no more progress display
            self.bar = None
