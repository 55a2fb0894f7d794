"""Learning-rate schedules as pure functions of the optimizer step.

Every schedule here is a plain function of ``(step, total_steps, peak_lr, spec)``; none keeps
state, so resuming from a checkpoint only needs the step, a cooldown branch only needs a
different ``decay_start_step``, and plots and tests evaluate the very same code the trainer uses.
This module imports only the standard library (matplotlib is imported inside `plot_schedule`),
so configs can be validated without loading torch.

Conventions
-----------
``step`` is the 0-based index of the optimizer step about to be taken; ``total_steps`` is the
planned number of optimizer steps. Progress through a decay is ``p = (step - start) / (total -
start)`` clipped to ``[0, 1]``, so the floor is the value at ``step == total_steps`` (the learning
rate after the last step); the last step actually taken uses a value just above it.

Warmup (all schedules): for ``step < warmup_steps``
``lr = target · (step + 1) / warmup_steps`` where ``target`` is the schedule's own value at
``step == warmup_steps``. For every schedule but ``power`` (and ``inverse_sqrt`` with a timescale
shorter than the warmup) the target is ``peak_lr``, i.e. ``lr = peak · (step + 1) / warmup``.
The ``+ 1`` keeps the first step from having a zero learning rate.

Schedules (``floor = min_lr_ratio · peak``):

* ``constant``: ``lr = peak``.
* ``cosine`` (Loshchilov & Hutter 2017, SGDR): ``p = (step - warmup) / (total - warmup)``,
  ``lr = floor + (peak - floor) · 0.5 · (1 + cos(pi · p))``.
* ``linear``: ``lr = floor + (peak - floor) · (1 - p)`` with the same ``p``.
* ``inverse_sqrt`` (Vaswani et al. 2017): ``lr = peak · sqrt(t0 / max(step, t0))`` with
  ``t0 = inv_sqrt_timescale`` or, by default, ``warmup_steps`` (1 when there is no warmup).
* ``wsd`` warmup-stable-decay (Hu et al. 2024, MiniCPM; Hägele et al. 2024): ``lr = peak`` until
  the decay start ``d = total - round(decay_fraction · total)`` (or ``decay_start_step``), then
  ``p = (step - d) / (total - d)`` and ``lr = floor + (peak - floor) · shape(p)``.
* ``power`` (Shen et al. 2024, "Power Scheduler: A Batch Size and Token Number Agnostic Learning
  Rate Scheduler"): ``lr = min(peak, B · a · n^b)`` with ``B = power_batch_size`` (the batch in
  sequences, as the paper counts it; ``batch_tokens`` when unset) and
  ``n = (step + 1) · B`` the tokens seen once the step is taken. With a final decay starting at
  ``d = total - round(power_decay_fraction · total)`` (or ``decay_start_step``):
  ``lr = f + (P(d) - f) · shape(p)``, ``p = (step - d) / (total - d)``, where ``P(d)`` is the
  power-law value at the decay start and ``f = min(floor, P(d))`` so the decay never rises.

Decay shapes ``shape(p)``, each going from 1 at ``p = 0`` to 0 at ``p = 1``: ``linear`` ``1 - p``;
``cosine`` ``0.5 · (1 + cos(pi · p))``; ``1-sqrt`` ``1 - sqrt(p)`` (Hägele et al. 2024: with a
zero floor, ``lr = peak · (1 - sqrt(p))``).

Phases (`phase_at`) label each step ``warmup``, ``stable`` or ``decay``. Checkpoints record them
and the scaling-law fitter relies on them: an intermediate point of a decaying schedule is *not*
the final loss of a shorter run, whereas the end of a WSD cooldown branch is.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from testbed.errors import ConfigError

SCHEDULES = ("constant", "cosine", "linear", "inverse_sqrt", "wsd", "power")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
PHASES = ("warmup", "stable", "decay")

# Schedules that have a separate, movable decay phase; only these accept decay_start_step.
_BRANCHABLE = ("wsd", "power")


@dataclass(frozen=True)
class ScheduleSpec:
    """The ``schedule:`` section of a training config (see the module docstring for formulas)."""

    name: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    decay_shape: str = "1-sqrt"
    inv_sqrt_timescale: int | None = None
    power_a: float = 4.0
    power_b: float = -0.51
    power_decay_fraction: float = 0.0
    decay_start_step: int | None = None
    # power: beta, the batch size in the law. Shen et al. count it in sequences (with n in
    # tokens); None uses batch_tokens. The trainer fills in the run's sequences per step.
    power_batch_size: int | None = None


def spec_from_dict(section: Mapping[str, Any] | None) -> ScheduleSpec:
    """Build a `ScheduleSpec` from a config's ``schedule:`` mapping, rejecting unknown keys."""
    if section is None:
        return ScheduleSpec()
    if not isinstance(section, Mapping):
        raise ConfigError(
            f"schedule is {section!r}; write it as a mapping such as {{name: cosine, warmup_steps: 100}}."
        )
    known = [f.name for f in fields(ScheduleSpec)]
    for key in section:
        if key not in known:
            raise ConfigError(f"schedule.{key} is not a schedule setting; {_suggest(str(key), known)}")
    return ScheduleSpec(**dict(section))


def _suggest(value: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
    listing = ", ".join(choices)
    if close:
        return f"did you mean {close[0]!r}? (choices: {listing})"
    return f"use one of: {listing}."


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `warmup_steps: true` is a config mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check_fraction(field: str, value: Any) -> None:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"schedule.{field} is {value!r}; set it to a number between 0 and 1.")


def validate(spec: ScheduleSpec, total_steps: int) -> None:
    """Raise `ConfigError` naming the field, the value and the fix when ``spec`` cannot run.

    ``batch_tokens`` (needed by ``power``) is checked by `lr_at`, since it comes from the data
    section rather than from the schedule.
    """
    if spec.name not in SCHEDULES:
        raise ConfigError(f"schedule.name is {spec.name!r}; {_suggest(str(spec.name), SCHEDULES)}")
    if spec.decay_shape not in DECAY_SHAPES:
        raise ConfigError(
            f"schedule.decay_shape is {spec.decay_shape!r}; {_suggest(str(spec.decay_shape), DECAY_SHAPES)}"
        )
    if not _is_int(total_steps) or total_steps < 1:
        raise ConfigError(f"total_steps is {total_steps!r}; train for a whole number of steps of at least 1.")
    w = spec.warmup_steps
    if not _is_int(w) or w < 0:
        raise ConfigError(f"schedule.warmup_steps is {w!r}; set it to a whole number of steps, 0 or more.")
    if w >= total_steps:
        raise ConfigError(
            f"schedule.warmup_steps is {w} but the run has only {total_steps} steps; "
            f"use fewer warmup steps than total steps."
        )
    _check_fraction("min_lr_ratio", spec.min_lr_ratio)
    _check_fraction("decay_fraction", spec.decay_fraction)
    _check_fraction("power_decay_fraction", spec.power_decay_fraction)
    t0 = spec.inv_sqrt_timescale
    if t0 is not None and (not _is_int(t0) or t0 < 1):
        raise ConfigError(
            f"schedule.inv_sqrt_timescale is {t0!r}; set it to a whole number of steps of at least 1, "
            f"or leave it empty to use warmup_steps."
        )
    if spec.power_batch_size is not None and (not _is_int(spec.power_batch_size) or spec.power_batch_size < 1):
        raise ConfigError(f"schedule.power_batch_size is {spec.power_batch_size!r}; set it to the batch size "
                          f"in sequences, or leave it unset to take the run's.")
    if not _is_number(spec.power_a) or spec.power_a <= 0:
        raise ConfigError(f"schedule.power_a is {spec.power_a!r}; set it to a positive number (the paper uses 4).")
    # A positive exponent would make the learning rate grow with tokens seen.
    if not _is_number(spec.power_b) or spec.power_b > 0:
        raise ConfigError(f"schedule.power_b is {spec.power_b!r}; set it to 0 or a negative number (the paper uses -0.51).")
    d = spec.decay_start_step
    if d is not None:
        if spec.name not in _BRANCHABLE:
            raise ConfigError(
                f"schedule.decay_start_step is {d!r} but schedule {spec.name!r} has no separate decay; "
                f"use name wsd or power, or remove decay_start_step."
            )
        if not _is_int(d) or not w <= d <= total_steps:
            raise ConfigError(
                f"schedule.decay_start_step is {d!r}; set it between warmup_steps ({w}) and the total steps "
                f"({total_steps})."
            )
    elif spec.name in _BRANCHABLE:
        field = "decay_fraction" if spec.name == "wsd" else "power_decay_fraction"
        start = _decay_start(total_steps, spec)
        if start is not None and start < w:
            raise ConfigError(
                f"schedule.{field} is {getattr(spec, field)!r}, which starts the decay at step {start}, inside "
                f"the {w}-step warmup; lower {field} or warmup_steps."
            )


def _decay_start(total_steps: int, spec: ScheduleSpec) -> int | None:
    """First step of the separate decay phase (wsd, power), or None when there is none."""
    if spec.name not in _BRANCHABLE:
        return None
    if spec.decay_start_step is not None:
        return spec.decay_start_step
    fraction = spec.decay_fraction if spec.name == "wsd" else spec.power_decay_fraction
    if spec.name == "power" and fraction == 0:
        return None
    return total_steps - round(fraction * total_steps)


def decay_shape(p: float, shape: str) -> float:
    """Decay factor from 1 at ``p = 0`` to 0 at ``p = 1`` (``p`` clipped to ``[0, 1]``)."""
    p = min(max(p, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(p)
    raise ConfigError(f"schedule.decay_shape is {shape!r}; {_suggest(str(shape), DECAY_SHAPES)}")


def _progress(step: int, start: int, total_steps: int) -> float:
    if total_steps <= start:
        return 0.0
    return min(max((step - start) / (total_steps - start), 0.0), 1.0)


def _power_law(step: int, peak_lr: float, spec: ScheduleSpec, batch_tokens: int) -> float:
    tokens_seen = (step + 1) * batch_tokens
    beta = spec.power_batch_size or batch_tokens
    return min(peak_lr, beta * spec.power_a * tokens_seen**spec.power_b)


def _after_warmup(step: int, total_steps: int, peak_lr: float, spec: ScheduleSpec, batch_tokens: int | None) -> float:
    """The schedule's value ignoring warmup (warmup scales this value taken at step = warmup)."""
    name = spec.name
    floor = spec.min_lr_ratio * peak_lr
    w = spec.warmup_steps
    if name == "constant":
        return peak_lr
    if name == "cosine":
        p = _progress(step, w, total_steps)
        return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    if name == "linear":
        p = _progress(step, w, total_steps)
        return floor + (peak_lr - floor) * (1.0 - p)
    if name == "inverse_sqrt":
        t0 = spec.inv_sqrt_timescale if spec.inv_sqrt_timescale is not None else max(w, 1)
        return peak_lr * math.sqrt(t0 / max(step, t0))
    start = _decay_start(total_steps, spec)
    if name == "wsd":
        if start is None or step < start:
            return peak_lr
        p = _progress(step, start, total_steps)
        return floor + (peak_lr - floor) * decay_shape(p, spec.decay_shape)
    if name == "power":
        assert batch_tokens is not None
        if start is None or step < start:
            return _power_law(step, peak_lr, spec, batch_tokens)
        at_start = _power_law(start, peak_lr, spec, batch_tokens)
        end = min(floor, at_start)
        p = _progress(step, start, total_steps)
        return end + (at_start - end) * decay_shape(p, spec.decay_shape)
    raise ConfigError(f"schedule.name is {name!r}; {_suggest(str(name), SCHEDULES)}")


def lr_at(
    step: int,
    total_steps: int,
    peak_lr: float,
    spec: ScheduleSpec,
    batch_tokens: int | None = None,
) -> float:
    """Learning rate for the optimizer step ``step`` (0-based) of a ``total_steps`` run.

    Steps past ``total_steps`` are allowed (the decay stays at its end value; constant,
    inverse_sqrt and power keep following their formula). ``batch_tokens`` (tokens per optimizer
    step) is required by ``power`` and ignored otherwise.
    """
    validate(spec, total_steps)
    if not _is_number(peak_lr) or peak_lr <= 0:
        raise ConfigError(f"peak learning rate is {peak_lr!r}; set it to a positive number such as 3e-4.")
    if spec.name == "power" and (not _is_int(batch_tokens) or batch_tokens < 1):
        raise ConfigError(
            f"batch_tokens is {batch_tokens!r} but schedule power needs the tokens per optimizer step; "
            f"pass the global batch size in tokens."
        )
    if not _is_int(step) or step < 0:
        # A negative step is a caller bug, not a config mistake.
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    w = spec.warmup_steps
    if step < w:
        target = _after_warmup(w, total_steps, peak_lr, spec, batch_tokens)
        return target * (step + 1) / w
    return _after_warmup(step, total_steps, peak_lr, spec, batch_tokens)


def lr_multiplier(
    step: int,
    total_steps: int,
    spec: ScheduleSpec,
    peak_lr: float = 1.0,
    batch_tokens: int | None = None,
) -> float:
    """``lr_at(...) / peak_lr``: the factor an optimizer's base learning rate is multiplied by.

    ``peak_lr`` matters only for ``power``, whose cap and power law are absolute learning rates.
    """
    return lr_at(step, total_steps, peak_lr, spec, batch_tokens) / peak_lr


def phase_at(step: int, total_steps: int, spec: ScheduleSpec) -> str:
    """``"warmup"``, ``"stable"`` or ``"decay"`` for the optimizer step ``step``.

    constant, inverse_sqrt and power (before its optional final decay) are ``stable`` after
    warmup, since stopping there is what a shorter run would have done; cosine and linear are
    ``decay`` from the end of warmup on, since their shape depends on the total length; wsd is
    ``stable`` until its decay start, then ``decay``.
    """
    validate(spec, total_steps)
    if step < spec.warmup_steps:
        return "warmup"
    if spec.name in ("cosine", "linear"):
        return "decay"
    start = _decay_start(total_steps, spec)
    if start is not None and start < total_steps and step >= start:
        return "decay"
    return "stable"


def schedule_table(
    total_steps: int,
    peak_lr: float,
    spec: ScheduleSpec,
    batch_tokens: int | None = None,
) -> list[float]:
    """Learning rate for every step ``0 .. total_steps - 1``."""
    return [lr_at(s, total_steps, peak_lr, spec, batch_tokens) for s in range(total_steps)]


def plot_schedule(
    path: str,
    total_steps: int,
    peak_lr: float,
    spec: ScheduleSpec,
    batch_tokens: int | None = None,
    title: str | None = None,
) -> None:
    """Write a PNG of the learning rate against the step, shading warmup and decay phases."""
    lrs = schedule_table(total_steps, peak_lr, spec, batch_tokens)
    phases = [phase_at(s, total_steps, spec) for s in range(total_steps)]

    import matplotlib

    matplotlib.use("Agg")  # files only: the CLI runs on headless cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    try:
        ax.plot(range(total_steps), lrs, color="C0", linewidth=1.5)
        colours = {"warmup": "C1", "decay": "C2"}
        start = 0
        for s in range(1, total_steps + 1):
            if s == total_steps or phases[s] != phases[start]:
                if phases[start] in colours:
                    ax.axvspan(start, s - 1 if s - 1 > start else start + 0.5, color=colours[phases[start]],
                               alpha=0.15, label=phases[start])
                start = s
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
        ax.set_xlim(0, max(total_steps - 1, 1))
        ax.set_ylim(bottom=0)
        ax.set_title(title or f"{spec.name} schedule, peak {peak_lr:g}, {total_steps} steps")
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
