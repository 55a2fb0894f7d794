"""Cooldown branches (Hägele et al. 2024; OLMo-core's WSD-S): one run with a stable phase at
the peak LR (wsd, constant, or any schedule that declares one), many training durations.

A branch starts from checkpoint S of the parent's stable phase, keeps the parent's data order
and optimiser state, and decays the LR over the last FRACTION of its own length
T = S / (1 - FRACTION). Its metrics.jsonl begins with the parent's lines up to S (they are
shared), so its curve reads as one run; run.json records the parent and the branch point.

Optimiser overrides (`--beta2`, `--weight-decay`, `--optim key=value`) change the AdamW
hyperparameters for the branch only, e.g. a higher beta2 during the cooldown (Dremov et al.
2025); the moments loaded from the parent are kept, and the branch's config records the values.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from testbed.config import from_dict, parse_override
from testbed.errors import TestbedError
from testbed.plan import describe, run_schedule
from testbed.rundir import RunDir
from testbed.schedules import DECAY_SHAPES, SCHEDULES
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


def phase_spans(spec, total: int) -> str:
    """The steps of each phase, as checkpoints name them (a checkpoint at step S is in the phase
    of 0-based step S - 1): 'warmup 1-5, stable 6-39, decay 40-49'."""
    warmup = min(max(int(spec.warmup_steps), 0), total)
    start = spec.decay_start(total)
    decay_from = start + 1 if start is not None and start < total else total + 1
    decay_from = max(decay_from, warmup + 1)
    spans = [("warmup", 1, warmup), ("stable", warmup + 1, decay_from - 1), ("decay", decay_from, total)]
    return ", ".join(f"{p} {a}" if a == b else f"{p} {a}-{b}" for p, a, b in spans if a <= b)


def stable_steps(spec, total: int) -> bool:
    """Whether the schedule has a stable phase in a run of `total` steps (asked of the schedule)."""
    return any(spec.phase(step, total) == "stable" for step in range(total))


def stable_checkpoints(parent_dir: str | Path, spec, total: int) -> list[int]:
    """The steps of the parent's saved checkpoints (index lines whose folder is still there) in
    its stable phase: the index line's `phase`, else the schedule's."""
    rd = RunDir(parent_dir)
    steps = set()
    try:
        lines = rd.index()
    except TestbedError:
        lines = []
    for line in lines:
        step = int(line["step"])
        if line.get("deleted") or not (rd.path / line["path"]).is_dir():
            continue
        phase = line.get("phase") or (spec.phase(step - 1, total) if 0 < step <= total else None)
        if phase == "stable":
            steps.add(step)
    return sorted(steps)


def stable_choices(parent_dir: str | Path | None, spec, total: int) -> str:
    """What to branch from instead: the stable-phase checkpoints the parent saved."""
    if parent_dir is None:
        return "branch from a checkpoint in its stable phase"
    steps = stable_checkpoints(parent_dir, spec, total)
    if not steps:
        return ("it saved no checkpoint in its stable phase to branch from (set checkpoint.every or "
                "checkpoint.at_tokens in the parent's stable phase)")
    shown = ", ".join(map(str, steps)) if len(steps) <= 12 else \
        ", ".join(map(str, steps[:5])) + f", ... ({len(steps) - 10} more), " + ", ".join(map(str, steps[-5:]))
    return f"branch from one of its stable-phase checkpoints: --step {shown}"


def branch_config(parent_config, step: int, fraction: float, shape: str,
                  optim: dict[str, Any] | None = None, parent_dir: str | Path | None = None):
    """parent_dir: where the parent's checkpoints are, so an error can name the ones to branch from."""
    if not 0 < fraction < 1:
        raise TestbedError(f"--decay {fraction} must be a fraction in (0, 1), e.g. 0.2")
    if shape not in DECAY_SHAPES:
        raise TestbedError(f"--shape {shape!r} is not a decay shape; choose one of {', '.join(DECAY_SHAPES)}")
    parent_steps = describe(parent_config)["planned_steps"]
    spec = run_schedule(parent_config, parent_steps)
    if not stable_steps(spec, parent_steps):
        raise TestbedError(f"the parent run's schedule ({spec.name!r}) has no stable phase in its "
                           f"{parent_steps} steps ({phase_spans(spec, parent_steps)}); branches start "
                           f"from a stable phase (schedule.name wsd or constant, or a schedule that "
                           f"declares one)")
    phases = f"its {parent_steps} steps: {phase_spans(spec, parent_steps)}"
    if not 0 < step <= parent_steps:
        where = "beyond the end of" if step > parent_steps else "not a step of"
        raise TestbedError(f"--step {step} is {where} the parent run ({phases}); "
                           f"{stable_choices(parent_dir, spec, parent_steps)}")
    if spec.phase(step - 1, parent_steps) != "stable":
        raise TestbedError(f"--step {step} is in the parent's {spec.phase(step - 1, parent_steps)} phase "
                           f"({phases}); {stable_choices(parent_dir, spec, parent_steps)}")
    # The branch cools down from the peak LR (wsd's decay); a parent whose stable phase runs
    # below its peak (an inverse square root, a power scheduler under its cap) would jump up at
    # the branch point, so its branches would not be cooldowns of that run.
    peak = parent_config.optim.lr
    at_branch = spec.lr(step - 1, parent_steps, peak, parent_config.train.global_batch_tokens)
    if not math.isclose(at_branch, peak, rel_tol=1e-9):
        raise TestbedError(f"--step {step}: the parent's learning rate there is {at_branch:.4g}, not its "
                           f"peak optim.lr={peak:g}; a branch decays from the peak, so it continues only a "
                           f"schedule whose stable phase holds the peak (wsd, constant)")
    total = math.ceil(step / (1 - fraction))
    tree = parent_config.to_dict()
    # The branch is a wsd run: the parent's fields wsd takes (warmup, floor) carry over, a user
    # schedule's own fields do not.
    wsd_fields = {f.name for f in dataclasses.fields(SCHEDULES.get("wsd"))}
    tree["schedule"] = {k: v for k, v in tree["schedule"].items() if k in wsd_fields}
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
    config = branch_config(parent_config, step, fraction, shape, optim, parent_dir)
    if not (parent_dir / "checkpoints" / ckpt.folder_name(step)).is_dir():
        total = describe(parent_config)["planned_steps"]
        raise TestbedError(f"--step {step}: {parent_dir} saved no checkpoint at that step; "
                           f"{stable_choices(parent_dir, run_schedule(parent_config, total), total)}")
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
