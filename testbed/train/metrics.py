"""Metrics: one JSON object a line in RUN_DIR/metrics.jsonl, mirrored to wandb.

metrics.jsonl keeps flat keys (train_loss, val_loss, task/NAME/METRIC: other code reads them);
wandb gets them namespaced: train/loss, train/lr, ..., val/loss, val/bpb, ..., eval/NAME/METRIC.

The wandb run is named after the run directory (RUN_DIR's name; PARENT/NAME for a branch in
PARENT/branches/), grouped by WANDB_RUN_GROUP (a sweep sets its name there) and tagged with
WANDB_TAGS (comma-separated; a study adds study:NAME and arm:SWEEP). logging.wandb_mode and
logging.wandb_project win where the config sets them; unset, WANDB_MODE and WANDB_PROJECT decide,
else offline mode in project "testbed". WANDB_DIR (else RUN_DIR) holds the wandb/ folder,
WANDB_ENTITY the entity. Offline mode writes a real run folder without any network; `wandb sync`
uploads it later.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Any

from testbed.rundir import BRANCHES, RunDir, clean

DEFAULT_MODE = "offline"
DEFAULT_PROJECT = "testbed"
TRAIN, VAL, EVAL = "train/", "val/", "eval/"


def wandb_key(key: str) -> str:
    """A metrics.jsonl key as wandb shows it: val_loss -> val/loss, task/hellaswag/acc ->
    eval/hellaswag/acc, train_loss -> train/loss, anything else (lr, tokens, ...) under train/."""
    if key.startswith("task/"):
        return EVAL + key[len("task/"):]
    if "/" in key:  # already namespaced
        return key
    if key.startswith("val_"):
        return VAL + key[len("val_"):]
    if key.startswith("train_"):
        return TRAIN + key[len("train_"):]
    return TRAIN + key


def run_name(run_dir: Path) -> str:
    """The run directory's name; a branch (PARENT/branches/NAME) is PARENT/NAME."""
    path = Path(run_dir).resolve()
    if path.parent.name == BRANCHES:
        return f"{path.parent.parent.name}/{path.name}"
    return path.name


def wandb_settings(project: str | None, mode: str | None, run_dir: Path,
                   env: dict[str, str] | None = None) -> dict[str, Any]:
    """wandb.init's arguments: the config's explicit values, else wandb's environment
    variables, else testbed's defaults (offline, project "testbed", the run directory)."""
    env = dict(os.environ if env is None else env)
    tags = [t.strip() for t in env.get("WANDB_TAGS", "").split(",") if t.strip()]
    return {
        "project": project or env.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        "mode": mode or env.get("WANDB_MODE") or DEFAULT_MODE,
        "dir": env.get("WANDB_DIR") or str(run_dir),
        "entity": env.get("WANDB_ENTITY") or None,
        "name": env.get("WANDB_NAME") or run_name(run_dir),
        "group": env.get("WANDB_RUN_GROUP") or None,
        "tags": list(dict.fromkeys(tags)) or None,
    }


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir = RunDir(run_dir)
        self.path = self.run_dir.metrics_path
        self.enabled = enabled
        self.wandb_run: Any = None
        self.wandb_thread: threading.Thread | None = None
        self.wandb_pending: list[dict[str, Any]] = []
        self.wandb_error: str | None = None

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines written after the checkpoint we resume from, so the log reads
        exactly like an uninterrupted run's."""
        if not self.enabled or not self.path.exists():
            return
        self.run_dir.write_metrics([line for line in self.run_dir.metrics() if line.get("step", 0) <= step])

    def start_wandb(self, project: str | None, mode: str | None, config: dict, run_dir: Path) -> None:
        """Start wandb in a background thread: importing it and starting its service takes ~2 s,
        which would otherwise be dead time before the first step. Records logged meanwhile are
        queued and sent, in order, once the run exists. `project` and `mode` None: from the
        environment, else the defaults (`wandb_settings`)."""
        settings = wandb_settings(project, mode, run_dir)
        if not self.enabled or settings["mode"] == "disabled":
            return
        if importlib.util.find_spec("wandb") is None:
            print("warning: logging.wandb is on but wandb is not installed here (pip install wandb, or "
                  "set logging.wandb=false); metrics.jsonl is complete", file=sys.stderr)
            return
        os.environ.setdefault("WANDB_SILENT", "true")

        def init() -> None:
            try:
                import wandb

                Path(settings["dir"]).mkdir(parents=True, exist_ok=True)
                self.wandb_run = wandb.init(config=config, reinit="finish_previous", **settings)
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
                self.wandb_run.log({wandb_key(k): v for k, v in record.items() if v is not None and k != "step"},
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
            print(f"warning: wandb did not start ({self.wandb_error}); metrics.jsonl is complete",
                  file=sys.stderr)
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
