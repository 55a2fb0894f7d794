"""What a run directory holds decides how a training process starts: fresh, resumed or already
done; and what makes the resumed run continue exactly (generator states, the preemption flag).
"""

from __future__ import annotations

import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import torch

from testbed.config import Config, read_yaml, saved_config
from testbed.errors import TestbedError
from testbed.plan import headline
from testbed.rundir import RunDir, write_text_atomic
from testbed.train import checkpoint as ckpt
from testbed.train.distributed import Dist, barrier

# Keys that may differ between an interrupted run and its resumption (they change no number).
RESUME_FREE_KEYS = ("logging", "train.device", "train.compile", "train.cuda_graphs", "train.micro_batch_size",
                    "train.parallel", "train.eval_every", "train.log_every", "train.divergence_nats", "train.tasks",
                    "train.collective_timeout_s", "checkpoint")


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
    """Decide what to do with RUN_DIR: 'fresh', 'resume' or 'done'. Never loses a finished run.

    Damaged bookkeeping does not block a resume: an empty or damaged status.json is an unknown
    state (the checkpoints decide), and a missing or damaged run.json is rebuilt from the
    checkpoints (each state.json holds the config), each with a warning in train.log."""
    rd = RunDir(run_dir)
    try:
        status = rd.read_status()
    except TestbedError as err:
        _note(rd, d, f"{err}; taking the run's state as unknown: its checkpoints decide")
        status = {}
    run_damage: str | None  # why run.json could not be read, if it could not
    try:
        run = rd.read_run()
        if run is not None and not isinstance(run.get("config"), dict):
            raise TestbedError(f"{rd.run_json} has no config")
    except TestbedError as err:
        run, run_damage = None, str(err)
    else:
        run_damage = None
    checkpoints = ckpt.list_checkpoints(rd.path)
    if overwrite and (rd.exists() or checkpoints):
        if d.main:
            for p in (rd.run_json, rd.status_json, rd.metrics_path, rd.log_path, rd.checkpoints, rd.averages_path,
                      rd.path / "wandb"):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        barrier(d)
        return "fresh"
    if status.get("state") == "done":
        if resume:
            diffs = config_differences(saved_config(run["config"]).to_dict(), config.to_dict()) if run else []
            diffs = [line for line in diffs if not line.startswith(("name:", "labels"))]  # names change no number
            if diffs:
                raise TestbedError(f"run directory {str(run_dir)!r} holds a finished run with a different "
                                   f"config ({'; '.join(diffs[:3])}); --resume accepts it only with its own "
                                   f"config: `testbed train --run-dir {run_dir} --resume` (no CONFIG) "
                                   f"takes it; pass --overwrite to train it again, or choose another --run-dir")
            return "done"
        raise TestbedError(f"run directory {str(run_dir)!r} already holds a finished run; pass "
                           f"--overwrite to replace it, --resume to accept it, or choose another --run-dir")
    if run is not None:
        saved, where = run["config"], f"{rd.run_json}"
    else:
        # The run record is gone or damaged: the newest checkpoint whose state.json reads holds the
        # config. Nothing is rebuilt yet; the trainer rewrites run.json once it resumed.
        states = (ckpt.read_state(folder) for folder in reversed(checkpoints))
        saved = next((s["config"] for s in states if s and isinstance(s.get("config"), dict)), None)
        where = f"the state.json of its checkpoints in {rd.checkpoints}"
        if saved is None:
            if run_damage:
                _note(rd, d, f"{run_damage}; no checkpoint to resume from, so the run starts again")
            return "fresh"
        _note(rd, d, f"{run_damage or f'{rd.run_json} is missing'}; resuming from the checkpoints "
                     f"(run.json is written again)")
    diffs = config_differences(saved_config(saved).to_dict(), config.to_dict())
    if diffs:
        raise TestbedError(f"run directory {str(run_dir)!r} holds an unfinished run with a different "
                           f"config ({'; '.join(diffs[:3])}); resume it with its own config (in {where}): "
                           f"`testbed train --run-dir {run_dir} --resume` (no CONFIG), pass --overwrite "
                           f"to discard it and start again, or choose another --run-dir")
    _check_logs(rd)
    if d.main:
        for line in ckpt.clear_interrupted(rd.path):
            _note(rd, d, line, warn=False)
    barrier(d)
    return "resume"


def _note(rd: RunDir, d: Dist, text: str, warn: bool = True) -> None:
    """A line in train.log (and a warning) about damage found and repaired before resuming."""
    if not d.main:
        return
    if warn:
        warnings.warn(text, stacklevel=3)
    try:
        rd.log(text)
    except OSError:
        pass  # the warning on stderr remains


def _check_logs(rd: RunDir) -> None:
    """Before anything is rewritten: the index and the metrics must read, or the error says how
    to repair them and resume."""
    fixes = {rd.index_path: "or delete the whole file: the resume indexes every verified checkpoint "
                            "folder again",
             rd.metrics_path: "lines after the checkpoint resumed from are written again"}
    for path, read in ((rd.index_path, rd.index), (rd.metrics_path, rd.metrics)):
        try:
            read()
        except TestbedError as err:
            raise TestbedError(f"{err} ({fixes[path]}), then run the same command with --resume "
                               f"to continue") from None


def load_run_config(run_dir: Path) -> Config:
    """The config of the run in RUN_DIR: its run.json's, else (run.json missing or damaged) its
    newest checkpoint's, else its config.yaml's (a sweep's run that never started)."""
    rd = RunDir(run_dir)
    try:
        run = rd.read_run()
    except TestbedError:
        run = None
    if run is not None and isinstance(run.get("config"), dict):
        return saved_config(run["config"])
    for folder in reversed(ckpt.list_checkpoints(rd.path)):
        state = ckpt.read_state(folder)
        if state and isinstance(state.get("config"), dict):
            return saved_config(state["config"])
    rd.read_run()  # damaged: its error names the file
    if rd.config_yaml.is_file():
        return saved_config(read_yaml(rd.config_yaml))
    raise TestbedError(f"{str(run_dir)!r} is not a run directory (no run.json); pass "
                       f"the folder given to `testbed train --run-dir`")


def announce(rd: RunDir, config: Config, info: dict, start_step: int, resumed: bool,
             device: torch.device, dtype: torch.dtype, world: int) -> None:
    """Rank 0, once the run directory is open: keep the resolved config in RUN_DIR/config.yaml
    (as a sweep writes it; `testbed train --run-dir RUN_DIR` reads it back) and print what is
    about to train, in two lines."""
    text = config.to_yaml()
    try:
        current = rd.config_yaml.read_text()
    except (OSError, UnicodeDecodeError):
        current = None
    if current != text:  # a sweep wrote the same text already
        write_text_atomic(rd.config_yaml, text)
    where = f"resumed at step {start_step}" if resumed else f"from step {start_step}" if start_step else "new"
    wandb = "wandb off"
    if config.logging.wandb:
        from testbed.train.metrics import wandb_settings  # where and how metrics.py starts it

        settings = wandb_settings(config.logging.wandb_project, config.logging.wandb_mode, rd.path)
        if settings["mode"] != "disabled":
            wandb = f"wandb {Path(settings['dir']) / 'wandb'} ({settings['mode']})"
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype).replace("torch.", ""))
    print(f"testbed train: {headline(info)}; {precision} on {device}"
          f"{f' x {world} processes' if world > 1 else ''}\n"
          f"  run dir {rd.path} ({where}), config {rd.config_yaml}, {wandb}", flush=True)


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the trainer saves at the next step boundary and exits
    PREEMPTED (testbed/exits.py)."""

    def __init__(self) -> None:
        self.requested: str | None = None  # the name of the signal received, once one is
        self.previous: dict[int, Any] = {}  # the handlers replaced, restored on exit

    def __enter__(self) -> Preemption:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread)
                pass
        return self

    def handle(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
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
