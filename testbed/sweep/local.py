"""Run a sweep on this machine: one run after another, or several at once.

Each worker slot claims the next startable run from the registry (under its lock), runs the
trainer as a subprocess with output appended to SWEEP_DIR/logs/<run_id>.log, and records the
exit status. A run that exits 75 (preempted) is simply started again and resumes from its
checkpoint; a failed run is retried until it has failed `max_retries + 1` times.

Slots: `workers` CPU processes (each limited to its share of the cores), or one per GPU with
CUDA_VISIBLE_DEVICES set to that GPU. Ctrl-C or SIGTERM asks every trainer to save and stop
(they exit 75 and stay resumable); nothing is lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any

from testbed.sweep.outcome import record_exit
from testbed.sweep.registry import Registry

# A run preempted again and again without us asking is more likely a loop than a machine
# being shared; stop re-running it after this many preemptions in one invocation.
MAX_PREEMPTIONS_PER_INVOCATION = 50


def trainer_command(registry: Registry, run_id: str, trainer: list[str] | None = None) -> list[str]:
    prefix = trainer or [sys.executable, "-m", "testbed", "train"]
    return [*prefix, str(registry.config_path(run_id)), "--run-dir", str(registry.run_dir(run_id))]


def worker_slots(workers: int, gpus: list[str] | None) -> list[dict[str, str]]:
    """Environment overrides for each concurrent slot."""
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in gpus]
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    return [{"OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
            for _ in range(max(1, workers))]


class LocalExecutor:
    def __init__(self, registry: Registry, run_ids: list[str], *, workers: int = 1,
                 gpus: list[str] | None = None, max_retries: int = 2, progress: bool = True,
                 trainer: list[str] | None = None):
        self.registry = registry
        self.run_ids = run_ids
        self.slots = worker_slots(workers, gpus)
        self.max_retries = max_retries
        self.progress = progress
        self.trainer = trainer
        self.stopping = threading.Event()
        self.children: dict[int, subprocess.Popen] = {}
        self.children_lock = threading.Lock()
        self.preempted_here: dict[str, int] = {}
        self.bar: Any = None

    def run(self) -> dict[str, int]:
        """Run every startable run; returns the count of runs per final state."""
        self.registry.logs_dir.mkdir(parents=True, exist_ok=True)
        self.registry.reconcile()
        previous = self._install_signal_handlers()
        self._open_progress()
        threads = [threading.Thread(target=self._slot_loop, args=(env,), daemon=True)
                   for env in self.slots]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(timeout=0.5)  # short joins keep the main thread responsive to signals
        finally:
            self._restore_signal_handlers(previous)
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

    def _slot_loop(self, env_overrides: dict[str, str]) -> None:
        while not self.stopping.is_set():
            candidates = [r for r in self.run_ids
                          if self.preempted_here.get(r, 0) < MAX_PREEMPTIONS_PER_INVOCATION]
            record = self.registry.claim(candidates, self.max_retries, "local", job_id=None)
            if record is None:
                return
            run_id = record["run_id"]
            exit_code = self._run_trainer(run_id, env_overrides)
            outcome = record_exit(self.registry, run_id, exit_code)
            if outcome["state"] == "preempted":
                self.preempted_here[run_id] = self.preempted_here.get(run_id, 0) + 1
            self._refresh_progress()

    def _run_trainer(self, run_id: str, env_overrides: dict[str, str]) -> int:
        env = {**os.environ, **env_overrides}
        command = trainer_command(self.registry, run_id, self.trainer)
        with open(self.registry.log_path(run_id), "ab") as log:
            log.write(f"\n=== {' '.join(command)}\n".encode())
            log.flush()
            with self.children_lock:
                if self.stopping.is_set():
                    return 75  # asked to stop before it started: still resumable
                child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)  # Ctrl-C reaches it via us only
                self.children[child.pid] = child
            try:
                return child.wait()
            finally:
                with self.children_lock:
                    self.children.pop(child.pid, None)

    # ------------------------------------------------------------------ stopping

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
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
                    child.send_signal(signal.SIGTERM)  # the trainer saves and exits 75
                except ProcessLookupError:
                    pass
        print("stopping: asked every running trainer to save a checkpoint and exit",
              file=sys.stderr)

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
        self.bar.n = counts.get("done", 0)
        self.bar.set_postfix({k: v for k, v in counts.items() if k != "done"}, refresh=False)
        self.bar.refresh()
