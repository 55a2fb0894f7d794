"""Cooldown branches (Hägele et al. 2024; OLMo-core's WSD-S): one WSD or constant run, many
training durations.

A branch starts from checkpoint S of the parent's stable phase, keeps the parent's data order
and optimiser state, and decays the LR over the last FRACTION of its own length
T = S / (1 - FRACTION). Its metrics.jsonl begins with the parent's lines up to S (they are
shared), so its curve reads as one run; run.json records the parent and the branch point.

Optimiser overrides (`--beta2`, `--weight-decay`, `--optim key=value`) change the AdamW
hyperparameters for the branch only, e.g. a higher beta2 during the cooldown (Dremov et al.
2025); the moments loaded from the parent are kept, and the branch's config records the values.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from testbed.config import from_dict, parse_override
from testbed.errors import TestbedError
from testbed.plan import describe, run_schedule
from testbed.rundir import RunDir
from testbed.schedules import DECAY_SHAPES
from testbed.train import checkpoint as ckpt
from testbed.train.trainer import load_run_config, train


def optim_overrides(beta2: float | None = None, weight_decay: float | None = None,
                    pairs: list[str] | None = None) -> dict[str, Any]:
    """The optim keys a branch changes, from the CLI's flags and `key=value` pairs."""
    out: dict[str, Any] = {}
    for text in pairs or []:
        key, value = parse_override(text)
        key = key.removeprefix("optim.")
        if key == "name":
            raise TestbedError("--optim name=...: a branch keeps the parent's optimiser (its state is "
                               "loaded); change betas, eps, weight_decay, grad_clip or z_loss")
        out[key] = value
    if beta2 is not None:
        out["beta2"] = beta2
    if weight_decay is not None:
        out["weight_decay"] = weight_decay
    return out


def apply_optim(section: dict[str, Any], overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if key == "beta2":
            section["betas"] = [section["betas"][0], value]
        else:
            section[key] = value


def override_tag(overrides: dict[str, Any]) -> str:
    """A short name for the overrides, for the branch's folder and run name."""
    def show(v: Any) -> str:
        return ",".join(f"{x:g}" for x in v) if isinstance(v, (list, tuple)) else \
            f"{v:g}" if isinstance(v, float) else str(v)
    return "".join(f"_{key}{show(value)}" for key, value in overrides.items())


def branch_config(parent_config, step: int, fraction: float, shape: str,
                  optim: dict[str, Any] | None = None):
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
    tree["train"].update(steps=total, tokens=None, tokens_per_param=None, flops=None)
    tree["name"] = f"{parent_config.name or 'run'}-branch{step}-{shape}-{fraction:g}{override_tag(optim or {})}"
    tree["labels"] = dict(tree.get("labels") or {}, branch_step=step, decay_fraction=fraction)
    if optim:
        apply_optim(tree["optim"], optim)
        tree["labels"]["branch_optim"] = override_tag(optim).lstrip("_")
    # Only the branch's own end is a science point; the shared prefix lives in the parent.
    tree["checkpoint"].update(every=None, log_spaced=0, at_tokens=[], rolling_every=None)
    return from_dict(tree)


def branch(parent_dir: str | Path, step: int, fraction: float, shape: str = "1-sqrt",
           run_dir: str | Path | None = None, optim: dict[str, Any] | None = None) -> dict:
    """optim: optimiser keys changed for the branch only (see optim_overrides)."""
    parent_dir = Path(parent_dir)
    parent_config = load_run_config(parent_dir)
    config = branch_config(parent_config, step, fraction, shape, optim)
    folder = ckpt.checkpoint_at(parent_dir, step)
    loaded = ckpt.load(folder)
    parent_run = RunDir(parent_dir)
    run_dir = Path(run_dir) if run_dir else parent_run.branch(
        f"step{step}_decay{fraction:g}_{shape}{override_tag(optim or {})}").path
    prefix = [line for line in parent_run.metrics() if line.get("step", 0) <= step]
    parent = {"run_dir": str(parent_dir.resolve()), "step": step, "checkpoint": str(folder)}
    summary = train(config, run_dir, init_from=loaded, parent=parent, prefix_metrics=prefix,
                    resume=RunDir(run_dir).exists())
    if summary.get("val_loss") is not None:
        print(f"{run_dir}: branch from step {step} decayed to step {config.train.steps}: "
              f"final val_loss {summary['val_loss']:.4f}")
    return summary
