"""What a run directory holds decides how a training process starts: fresh, resumed or already
done; and what makes the resumed run continue exactly (generator states, the preemption flag).
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import torch

from testbed.config import Config, saved_config
from testbed.errors import TestbedError
from testbed.rundir import RunDir
from testbed.train.distributed import Dist, barrier

# Keys that may differ between an interrupted run and its resumption (they change no number).
RESUME_FREE_KEYS = ("logging", "train.device", "train.compile", "train.micro_batch_size", "train.parallel",
                    "train.eval_every", "train.log_every", "train.divergence_nats", "checkpoint")


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        full = prefix + key
        if any(full == k or full.startswith(k + ".") for k in RESUME_FREE_KEYS):
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, full + ".")
        elif va != vb:
            out.append(f"{full}: {va!r} -> {vb!r}")
    return out


def prepare_run_dir(config: Config, run_dir: Path, resume: bool, overwrite: bool, d: Dist) -> str:
    """Decide what to do with RUN_DIR: 'fresh', 'resume' or 'done'. Never loses a finished run."""
    rd = RunDir(run_dir)
    status = rd.read_status()
    has_run = rd.exists()
    if overwrite and has_run:
        if d.main:
            for p in (rd.run_json, rd.status_json, rd.metrics_path, rd.log_path, rd.checkpoints, rd.path / "wandb"):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        barrier(d)
        return "fresh"
    if status.get("state") == "done":
        if resume:
            run = rd.read_run()
            diffs = config_differences(saved_config(run["config"]).to_dict(), config.to_dict()) if run else []
            diffs = [line for line in diffs if not line.startswith(("name:", "labels"))]  # names change no number
            if diffs:
                raise TestbedError(f"run directory {str(run_dir)!r} holds a finished run with a different "
                                   f"config ({'; '.join(diffs[:3])}); --resume accepts it only with its own "
                                   f"config (RUN_DIR/run.json); pass --overwrite to train it again, or "
                                   f"choose another --run-dir")
            return "done"
        raise TestbedError(f"run directory {str(run_dir)!r} already holds a finished run; pass "
                           f"--overwrite to replace it, --resume to accept it, or choose another --run-dir")
    if has_run:
        saved = saved_config(rd.read_run()["config"]).to_dict()
        diffs = config_differences(saved, config.to_dict())
        if diffs:
            raise TestbedError(f"run directory {str(run_dir)!r} holds an unfinished run with a different "
                               f"config ({'; '.join(diffs[:3])}); resume it with its own config "
                               f"(RUN_DIR/run.json), pass --overwrite to discard it and start again, "
                               f"or choose another --run-dir")
        return "resume"
    return "fresh"


def load_run_config(run_dir: Path) -> Config:
    run = RunDir(run_dir).read_run()
    if run is None:
        raise TestbedError(f"{str(run_dir)!r} is not a run directory (no run.json); pass the folder "
                           f"given to `testbed train --run-dir`")
    return saved_config(run["config"])


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the trainer saves at the next step boundary and exits
    PREEMPTED (testbed/exits.py)."""

    def __init__(self):
        self.requested: str | None = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread)
                pass
        return self

    def handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["torch_cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    """CPU and CUDA generators as saved; a CUDA state is skipped on a CPU (a resume that changes
    device is allowed: the batches are still exact, only dropout masks differ)."""
    if "torch_cpu" in rng:
        torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["torch_cuda"], device)
