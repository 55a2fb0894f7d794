"""Cooldown branches (Hägele et al. 2024; OLMo-core's WSD-S): one WSD or constant run, many
training durations.

A branch starts from checkpoint S of the parent's stable phase, keeps the parent's data order
and optimiser state, and decays the LR over the last FRACTION of its own length
T = S / (1 - FRACTION). Its metrics.jsonl begins with the parent's lines up to S (they are
shared), so its curve reads as one run; run.json records the parent and the branch point.
"""

from __future__ import annotations

import math
from pathlib import Path

from testbed.config import from_dict
from testbed.errors import TestbedError
from testbed.plan import describe, run_schedule
from testbed.rundir import RunDir
from testbed.schedules import DECAY_SHAPES
from testbed.train import checkpoint as ckpt
from testbed.train.trainer import load_run_config, train


def branch_config(parent_config, step: int, fraction: float, shape: str):
    if not 0 < fraction < 1:
        raise TestbedError(f"--decay {fraction} must be a fraction in (0, 1), e.g. 0.2")
    if shape not in DECAY_SHAPES:
        raise TestbedError(f"--shape {shape!r} is not a decay shape; choose one of {', '.join(DECAY_SHAPES)}")
    name = parent_config.schedule.name
    if name not in ("wsd", "constant"):
        raise TestbedError(f"the parent run's schedule is {name!r}; branches need a stable phase "
                           f"(schedule.name wsd or constant)")
    parent_steps = describe(parent_config)["planned_steps"]
    spec = run_schedule(parent_config, parent_steps)
    if spec.phase(step - 1, parent_steps) != "stable":
        raise TestbedError(f"--step {step} is in the parent's {spec.phase(step - 1, parent_steps)} "
                           f"phase; branch from a checkpoint in its stable phase")
    total = math.ceil(step / (1 - fraction))
    tree = parent_config.to_dict()
    tree["schedule"].update(name="wsd", decay_shape=shape, decay_start_step=step,
                            decay_fraction=(total - step) / total)
    if tree["schedule"].get("warmup_fraction") is not None:
        tree["schedule"]["warmup_steps"] = spec.warmup_steps
        tree["schedule"]["warmup_fraction"] = None
    tree["train"].update(steps=total, tokens=None, tokens_per_param=None)
    tree["name"] = f"{parent_config.name or 'run'}-branch{step}-{shape}-{fraction:g}"
    tree["labels"] = dict(tree.get("labels") or {}, branch_step=step, decay_fraction=fraction)
    # Only the branch's own end is a science point; the shared prefix lives in the parent.
    tree["checkpoint"].update(every=None, log_spaced=0, at_tokens=[], rolling_every=None)
    return from_dict(tree)


def branch(parent_dir: str | Path, step: int, fraction: float, shape: str = "1-sqrt",
           run_dir: str | Path | None = None) -> dict:
    parent_dir = Path(parent_dir)
    parent_config = load_run_config(parent_dir)
    config = branch_config(parent_config, step, fraction, shape)
    folder = ckpt.checkpoint_at(parent_dir, step)
    loaded = ckpt.load(folder)
    parent_run = RunDir(parent_dir)
    run_dir = Path(run_dir) if run_dir else parent_run.branch(f"step{step}_decay{fraction:g}_{shape}").path
    prefix = [line for line in parent_run.metrics() if line.get("step", 0) <= step]
    parent = {"run_dir": str(parent_dir.resolve()), "step": step, "checkpoint": str(folder)}
    summary = train(config, run_dir, init_from=loaded, parent=parent, prefix_metrics=prefix,
                    resume=RunDir(run_dir).exists())
    if summary.get("val_loss") is not None:
        print(f"{run_dir}: branch from step {step} decayed to step {config.train.steps}: "
              f"final val_loss {summary['val_loss']:.4f}")
    return summary
