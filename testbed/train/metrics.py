"""Metrics: one JSON object a line in RUN_DIR/metrics.jsonl, mirrored to wandb.

wandb runs in offline mode by default, which writes a real run folder under RUN_DIR/wandb
without any network; `wandb sync` uploads it later.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from testbed.rundir import RunDir, clean


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir = RunDir(run_dir)
        self.path = self.run_dir.metrics_path
        self.enabled = enabled
        self.wandb_run = None
        self.wandb_thread: threading.Thread | None = None
        self.wandb_pending: list[dict[str, Any]] = []
        self.wandb_error: str | None = None

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines written after the checkpoint we resume from, so the log reads
        exactly like an uninterrupted run's."""
        if not self.enabled or not self.path.exists():
            return
        self.run_dir.write_metrics([line for line in self.run_dir.metrics() if line.get("step", 0) <= step])

    def start_wandb(self, project: str, mode: str, name: str, config: dict, run_dir: Path) -> None:
        """Start wandb in a background thread: importing it and starting its service takes ~2 s,
        which would otherwise be dead time before the first step. Records logged meanwhile are
        queued and sent, in order, once the run exists."""
        if not self.enabled or mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")

        def init() -> None:
            try:
                import wandb

                self.wandb_run = wandb.init(project=project, mode=mode, name=name, dir=str(run_dir),
                                            config=config, reinit="finish_previous")
            except Exception as err:  # logging must never stop training
                self.wandb_error = f"{type(err).__name__}: {err}"

        self.wandb_thread = threading.Thread(target=init, name="wandb-init", daemon=True)
        self.wandb_thread.start()

    def _flush_wandb(self, wait: bool = False) -> None:
        thread = self.wandb_thread
        if thread is None or (thread.is_alive() and not wait):
            return
        thread.join()
        if self.wandb_run is not None:
            for record in self.wandb_pending:
                self.wandb_run.log({k: v for k, v in record.items() if v is not None and k != "step"},
                                   step=record["step"])
        self.wandb_pending = []

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = clean(record)
        self.run_dir.append_metrics(record)
        if self.wandb_thread is not None:
            self.wandb_pending.append(record)
            self._flush_wandb()

    def finish(self, exit_code: int = 0) -> None:
        self._flush_wandb(wait=True)
        if self.wandb_error:
            print(f"warning: wandb did not start ({self.wandb_error}); metrics.jsonl is complete")
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
