"""Learning-rate schedules as pure functions of the optimizer step.

Each schedule is one small frozen dataclass registered by name in `SCHEDULES` (as the model
parts are in testbed.model.transformer): its own fields, `validate(total_steps)`, and the pure
functions `lr(step, total_steps, peak_lr, batch_tokens)` and `phase(step, total_steps)`. None
keeps state, so resuming from a checkpoint only needs the step, a cooldown branch only needs a
different ``decay_start_step``, and plots and tests evaluate the very same code the trainer uses.
A user's schedule is a subclass of `Schedule` registered from a module named in the config's
``imports:``. This module imports only the standard library (matplotlib is imported inside
`plot_schedule`), so configs can be validated without loading torch.

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
the final loss of a shorter run, whereas the end of a WSD cooldown branch is. Every schedule
declares its phases, none is assumed: the class attribute ``decays`` (True: every step after
warmup is ``decay``; False: every one is ``stable``) or a ``decay_start`` method (a decay phase
that starts later, e.g. wsd's). Registering a schedule that declares neither, in the class that
defines its learning rate or below, is a `ConfigError` (`check_declares_phases`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

from testbed.errors import ConfigError
from testbed.registry import Registry

SCHEDULES = Registry("schedule", "schedule.name", check=lambda name, cls: check_declares_phases(name, cls))
DEFAULT_SCHEDULE = "cosine"
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
PHASES = ("warmup", "stable", "decay")
# Fields, in any schedule, that `check_fields` holds to [0, 1] or to a least whole number.
FRACTION_FIELDS = ("warmup_fraction", "min_lr_ratio", "decay_fraction", "power_decay_fraction")
COUNT_FIELDS = {"warmup_steps": 0, "decay_start_step": 0, "inv_sqrt_timescale": 1, "power_batch_size": 1}


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


def _progress(step: int, start: int, total_steps: int) -> float:
    if total_steps <= start:
        return 0.0
    return min(max((step - start) / (total_steps - start), 0.0), 1.0)


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


# ----------------------------------------------------------------------------- the unit


@dataclass(frozen=True)
class Schedule:
    """One schedule: the warmup every schedule shares plus, in a subclass, its own fields.

    A subclass overrides `after_warmup` (its value ignoring warmup) and `check` (its own fields),
    and declares its phases: ``decays = True`` or ``False``, or a `decay_start` method. `lr` and
    `phase` never validate: call `validate` (or `check_run`) once when the run is built, then
    call them every step.
    """

    warmup_steps: int = 0
    # The warmup as a share of the run, resolved to warmup_steps by `for_run` once the run
    # length is known (the config can give either).
    warmup_fraction: float | None = None

    needs_batch_tokens: ClassVar[bool] = False  # lr() reads batch_tokens (power)
    # The phases after warmup, declared by every schedule (or by a `decay_start` method): True,
    # all `decay` (the curve depends on the run's length, so stopping early is not a shorter
    # run); False, all `stable` (stopping at any step gives what a shorter run would have).
    decays: ClassVar[bool | None] = None

    @property
    def name(self) -> str:
        return SCHEDULES.name_of(type(self)) or type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        """The ``schedule:`` config section this object is built from."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}

    def for_run(self, total_steps: int, batch_sequences: int | None = None) -> Schedule:
        """This schedule with the values that depend on the run filled in."""
        if self.warmup_fraction is None:
            return self
        _check_fraction("warmup_fraction", self.warmup_fraction)
        return replace(self, warmup_steps=int(round(self.warmup_fraction * total_steps)), warmup_fraction=None)

    def validate(self, total_steps: int) -> None:
        """Raise `ConfigError` naming the field, the value and the fix when this cannot run."""
        if not _is_int(total_steps) or total_steps < 1:
            raise ConfigError(f"total_steps is {total_steps!r}; train for a whole number of steps of at least 1.")
        if self.warmup_fraction is not None:
            _check_fraction("warmup_fraction", self.warmup_fraction)
            self.for_run(total_steps).validate(total_steps)
            return
        w = self.warmup_steps
        if not _is_int(w) or w < 0:
            raise ConfigError(f"schedule.warmup_steps is {w!r}; set it to a whole number of steps, 0 or more.")
        if w >= total_steps:
            raise ConfigError(
                f"schedule.warmup_steps is {w} but the run has only {total_steps} steps; "
                f"use fewer warmup steps than total steps."
            )
        self.check(total_steps)

    def check_fields(self) -> None:
        """The ranges that hold whatever the run's length (config validation calls this; the
        checks against total_steps come in `validate`): fractions in [0, 1], step counts whole
        and not negative, a known decay shape."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name in FRACTION_FIELDS:
                _check_fraction(f.name, value)
            elif f.name in COUNT_FIELDS and (not _is_int(value) or value < COUNT_FIELDS[f.name]):
                raise ConfigError(f"schedule.{f.name} is {value!r}; set it to a whole number of steps, "
                                  f"{COUNT_FIELDS[f.name]} or more.")
            elif f.name == "decay_shape" and value not in DECAY_SHAPES:
                raise ConfigError(f"schedule.decay_shape is {value!r}; {_suggest(str(value), DECAY_SHAPES)}")

    def check(self, total_steps: int) -> None:
        """Validate the subclass's own fields (warmup and total_steps are already checked)."""

    def after_warmup(self, step: int, total_steps: int, peak_lr: float, batch_tokens: int | None) -> float:
        """The schedule's value ignoring warmup (warmup scales this value taken at step = warmup)."""
        raise NotImplementedError

    def decay_start(self, total_steps: int) -> int | None:
        """First step of the decay phase, or None when there is none: from `decays`, or
        overridden by a schedule whose decay starts later (wsd, power)."""
        if self.decays is None:  # registration refuses such a schedule (check_declares_phases)
            raise NotImplementedError(f"schedule {self.name!r} declares no phases; {PHASES_FIX}")
        return self.warmup_steps if self.decays else None

    def lr(self, step: int, total_steps: int, peak_lr: float, batch_tokens: int | None = None) -> float:
        w = self.warmup_steps
        if step < w:
            return self.after_warmup(w, total_steps, peak_lr, batch_tokens) * (step + 1) / w
        return self.after_warmup(step, total_steps, peak_lr, batch_tokens)

    def phase(self, step: int, total_steps: int) -> str:
        """``"warmup"``, ``"stable"`` or ``"decay"``: a ``stable`` step is where stopping gives what
        a shorter run would have given."""
        if step < self.warmup_steps:
            return "warmup"
        start = self.decay_start(total_steps)
        if start is not None and start < total_steps and step >= start:
            return "decay"
        return "stable"


# ----------------------------------------------------------------------------- phases


PHASES_FIX = ("set `decays = True` in the class (every step after warmup decays: the curve depends on the run's "
              "length), `decays = False` (every step after warmup is stable: stopping there gives what a shorter "
              "run would), or define `decay_start(self, total_steps)` returning the first decay step (None: none)")


def _first_defining(cls: type, names: tuple[str, ...]) -> int | None:
    """The place in `cls`'s method resolution order of the first class below Schedule that sets
    one of `names` (a `decays` of None sets nothing), or None."""
    for place, klass in enumerate(cls.__mro__):
        if klass is Schedule:
            return None
        if any(n in vars(klass) and not (n == "decays" and vars(klass)[n] is None) for n in names):
            return place
    return None


def check_declares_phases(name: str, cls: Any) -> None:
    """Registration refuses a schedule whose phases are not declared by the class that defines
    its learning rate (or a subclass of it): its checkpoints would otherwise be labelled stable
    whatever the curve does, and the fitter would take decayed points for clean ones."""
    where = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}"
    if not (isinstance(cls, type) and issubclass(cls, Schedule)):
        raise ConfigError(f"schedule {name!r} ({where}) is not a Schedule; register a frozen dataclass "
                          f"subclassing testbed.schedules.Schedule")
    declared = _first_defining(cls, ("decays", "decay_start", "phase"))
    curve = _first_defining(cls, ("after_warmup", "lr"))
    if declared is None:
        raise ConfigError(f"schedule {name!r} ({where}) does not declare its phases; {PHASES_FIX}")
    if curve is not None and declared > curve:
        raise ConfigError(f"schedule {name!r} ({where}) does not declare its phases (it inherits "
                          f"{cls.__mro__[declared].__qualname__}'s phases but {cls.__mro__[curve].__qualname__} "
                          f"defines a learning rate of its own); {PHASES_FIX}")


def checkpoint_phase(section: Mapping[str, Any], step: int, total_steps: int) -> str | None:
    """The phase a run's checkpoint at `step` (steps done) is in, asked of the schedule its saved
    ``schedule:`` section names (a checkpoint at step S is in the phase of 0-based step S - 1);
    None when that schedule is not registered (its module not imported) or the section does not
    build."""
    try:
        cls = schedule_class(section.get("name", DEFAULT_SCHEDULE))
        accepted = {f.name for f in fields(cls)}  # older runs saved every schedule's fields
        spec = cls(**{k: v for k, v in section.items() if k in accepted}).for_run(total_steps)
        return spec.phase(max(int(step) - 1, 0), total_steps)
    except (ConfigError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- the schedules


@SCHEDULES.register("constant")
@dataclass(frozen=True)
class Constant(Schedule):
    decays = False

    def after_warmup(self, step, total_steps, peak_lr, batch_tokens):
        return peak_lr


@dataclass(frozen=True)
class _Annealed(Schedule):
    """Decays from the end of warmup to the floor at total_steps: every step after warmup is
    ``decay``, since the shape depends on the total length."""

    min_lr_ratio: float = 0.1

    decays = True

    def check(self, total_steps):
        _check_fraction("min_lr_ratio", self.min_lr_ratio)

    def shape(self, p: float) -> float:
        raise NotImplementedError

    def after_warmup(self, step, total_steps, peak_lr, batch_tokens):
        floor = self.min_lr_ratio * peak_lr
        return floor + (peak_lr - floor) * self.shape(_progress(step, self.warmup_steps, total_steps))


@SCHEDULES.register("cosine")
@dataclass(frozen=True)
class Cosine(_Annealed):
    def shape(self, p):
        return 0.5 * (1.0 + math.cos(math.pi * p))


@SCHEDULES.register("linear")
@dataclass(frozen=True)
class Linear(_Annealed):
    def shape(self, p):
        return 1.0 - p


@SCHEDULES.register("inverse_sqrt")
@dataclass(frozen=True)
class InverseSqrt(Schedule):
    inv_sqrt_timescale: int | None = None  # t0; None: warmup_steps (1 without warmup)

    decays = False  # the value at a step does not depend on the run's length

    def check(self, total_steps):
        t0 = self.inv_sqrt_timescale
        if t0 is not None and (not _is_int(t0) or t0 < 1):
            raise ConfigError(
                f"schedule.inv_sqrt_timescale is {t0!r}; set it to a whole number of steps of at least 1, "
                f"or leave it empty to use warmup_steps."
            )

    def after_warmup(self, step, total_steps, peak_lr, batch_tokens):
        t0 = self.inv_sqrt_timescale if self.inv_sqrt_timescale is not None else max(self.warmup_steps, 1)
        return peak_lr * math.sqrt(t0 / max(step, t0))


def _check_decay(s: Any, total_steps: int, fraction_field: str) -> None:
    """Shared by the schedules with a movable final decay (wsd, power): cooldown branches set
    decay_start_step (testbed/train/branch.py)."""
    _check_fraction("min_lr_ratio", s.min_lr_ratio)
    _check_fraction(fraction_field, getattr(s, fraction_field))
    if s.decay_shape not in DECAY_SHAPES:
        raise ConfigError(f"schedule.decay_shape is {s.decay_shape!r}; {_suggest(str(s.decay_shape), DECAY_SHAPES)}")
    w, d = s.warmup_steps, s.decay_start_step
    if d is not None:
        if not _is_int(d) or not w <= d <= total_steps:
            raise ConfigError(
                f"schedule.decay_start_step is {d!r}; set it between warmup_steps ({w}) and the total steps "
                f"({total_steps})."
            )
        return
    start = s.decay_start(total_steps)
    if start is not None and start < w:
        raise ConfigError(
            f"schedule.{fraction_field} is {getattr(s, fraction_field)!r}, which starts the decay at step {start}, "
            f"inside the {w}-step warmup; lower {fraction_field} or warmup_steps."
        )


@SCHEDULES.register("wsd")
@dataclass(frozen=True)
class WSD(Schedule):
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    decay_shape: str = "1-sqrt"
    decay_start_step: int | None = None

    def check(self, total_steps):
        _check_decay(self, total_steps, "decay_fraction")

    def decay_start(self, total_steps):
        if self.decay_start_step is not None:
            return self.decay_start_step
        return total_steps - round(self.decay_fraction * total_steps)

    def after_warmup(self, step, total_steps, peak_lr, batch_tokens):
        start = self.decay_start(total_steps)
        if step < start:
            return peak_lr
        floor = self.min_lr_ratio * peak_lr
        return floor + (peak_lr - floor) * decay_shape(_progress(step, start, total_steps), self.decay_shape)


@SCHEDULES.register("power")
@dataclass(frozen=True)
class Power(Schedule):
    min_lr_ratio: float = 0.1
    decay_shape: str = "1-sqrt"
    power_a: float = 4.0
    power_b: float = -0.51
    power_decay_fraction: float = 0.0
    decay_start_step: int | None = None
    # beta, the batch size in the law. Shen et al. count it in sequences (with n in tokens);
    # None uses batch_tokens. `for_run` fills in the run's sequences per step.
    power_batch_size: int | None = None

    needs_batch_tokens: ClassVar[bool] = True

    def for_run(self, total_steps, batch_sequences=None):
        out = super().for_run(total_steps, batch_sequences)
        if out.power_batch_size is None and batch_sequences is not None:
            out = replace(out, power_batch_size=batch_sequences)
        return out

    def check(self, total_steps):
        self.check_fields()
        _check_decay(self, total_steps, "power_decay_fraction")

    def check_fields(self):
        super().check_fields()
        if self.power_batch_size is not None and (not _is_int(self.power_batch_size) or self.power_batch_size < 1):
            raise ConfigError(f"schedule.power_batch_size is {self.power_batch_size!r}; set it to the batch size "
                              f"in sequences, or leave it unset to take the run's.")
        if not _is_number(self.power_a) or self.power_a <= 0:
            raise ConfigError(f"schedule.power_a is {self.power_a!r}; set it to a positive number (the paper uses 4).")
        # A positive exponent would make the learning rate grow with tokens seen.
        if not _is_number(self.power_b) or self.power_b > 0:
            raise ConfigError(f"schedule.power_b is {self.power_b!r}; set it to 0 or a negative number "
                              f"(the paper uses -0.51).")

    def decay_start(self, total_steps):
        if self.decay_start_step is not None:
            return self.decay_start_step
        if self.power_decay_fraction == 0:
            return None
        return total_steps - round(self.power_decay_fraction * total_steps)

    def _law(self, step: int, peak_lr: float, batch_tokens: int) -> float:
        tokens_seen = (step + 1) * batch_tokens
        beta = self.power_batch_size or batch_tokens
        return min(peak_lr, beta * self.power_a * tokens_seen**self.power_b)

    def after_warmup(self, step, total_steps, peak_lr, batch_tokens):
        start = self.decay_start(total_steps)
        if start is None or step < start:
            return self._law(step, peak_lr, batch_tokens)
        at_start = self._law(start, peak_lr, batch_tokens)
        end = min(self.min_lr_ratio * peak_lr, at_start)
        return end + (at_start - end) * decay_shape(_progress(step, start, total_steps), self.decay_shape)


# ----------------------------------------------------------------------------- building


def schedule_class(name: Any) -> type[Schedule]:
    if name not in SCHEDULES:
        raise ConfigError(f"schedule.name is {name!r}; {_suggest(str(name), SCHEDULES.names())}")
    return SCHEDULES.get(name)


def split_section(section: Mapping[str, Any] | None) -> tuple[type[Schedule], dict[str, Any]]:
    """The class a ``schedule:`` mapping names and its other keys, each checked to be one of
    that schedule's fields (the config layer then converts their types)."""
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(
            f"schedule is {section!r}; write it as a mapping such as {{name: cosine, warmup_steps: 100}}."
        )
    values = dict(section)
    name = values.pop("name", DEFAULT_SCHEDULE)
    cls = schedule_class(name)
    accepted = [f.name for f in fields(cls)]
    for key, value in values.items():
        if key in accepted:
            continue
        owners = [n for n, c in SCHEDULES.items() if key in {f.name for f in fields(c)}]
        if owners:
            raise ConfigError(
                f"schedule.{key} is {value!r} but schedule {name!r} has no {key} (it takes {', '.join(accepted)}); "
                f"{key} belongs to {' or '.join(owners)}: remove it or change schedule.name."
            )
        raise ConfigError(f"schedule.{key} is not a schedule setting; {_suggest(str(key), accepted)}")
    return cls, values


def spec_from_dict(section: Mapping[str, Any] | None) -> Schedule:
    """Build a schedule from a ``schedule:`` mapping, rejecting keys that schedule has not."""
    cls, values = split_section(section)
    return cls(**values)


def make_schedule(name: str = DEFAULT_SCHEDULE, **values: Any) -> Schedule:
    """``make_schedule("wsd", warmup_steps=10)``: the schedule a config section would give."""
    return spec_from_dict({"name": name, **values})


# ----------------------------------------------------------------------------- one-off use
# The trainer validates once (`check_run`) and then calls `schedule.lr` every step; these
# helpers validate on every call, for tests, plots and scripts.


def validate(schedule: Schedule, total_steps: int) -> None:
    schedule.validate(total_steps)


def check_run(schedule: Schedule, total_steps: int, peak_lr: float, batch_tokens: int | None = None) -> None:
    """Everything `lr` needs: the schedule's fields, the peak and, for power, the batch."""
    schedule.validate(total_steps)
    if not _is_number(peak_lr) or peak_lr <= 0:
        raise ConfigError(f"peak learning rate is {peak_lr!r}; set it to a positive number such as 3e-4.")
    if schedule.needs_batch_tokens and (batch_tokens is None or not _is_int(batch_tokens) or batch_tokens < 1):
        raise ConfigError(
            f"batch_tokens is {batch_tokens!r} but schedule {schedule.name} needs the tokens per optimizer step; "
            f"pass the global batch size in tokens."
        )


def lr_at(step: int, total_steps: int, peak_lr: float, schedule: Schedule, batch_tokens: int | None = None) -> float:
    """Learning rate for the optimizer step ``step`` (0-based) of a ``total_steps`` run.

    Steps past ``total_steps`` are allowed (the decay stays at its end value; constant,
    inverse_sqrt and power keep following their formula).
    """
    check_run(schedule, total_steps, peak_lr, batch_tokens)
    if not _is_int(step) or step < 0:
        # A negative step is a caller bug, not a config mistake.
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return schedule.lr(step, total_steps, peak_lr, batch_tokens)


def lr_multiplier(step: int, total_steps: int, schedule: Schedule, peak_lr: float = 1.0,
                  batch_tokens: int | None = None) -> float:
    """``lr_at(...) / peak_lr``; ``peak_lr`` matters only for ``power``, whose cap and power law
    are absolute learning rates."""
    return lr_at(step, total_steps, peak_lr, schedule, batch_tokens) / peak_lr


def phase_at(step: int, total_steps: int, schedule: Schedule) -> str:
    schedule.validate(total_steps)
    return schedule.phase(step, total_steps)


def schedule_table(total_steps: int, peak_lr: float, schedule: Schedule, batch_tokens: int | None = None) -> list[float]:
    """Learning rate for every step ``0 .. total_steps - 1``."""
    check_run(schedule, total_steps, peak_lr, batch_tokens)
    return [schedule.lr(s, total_steps, peak_lr, batch_tokens) for s in range(total_steps)]


def plot_schedule(
    path: str,
    total_steps: int,
    peak_lr: float,
    schedule: Schedule,
    batch_tokens: int | None = None,
    title: str | None = None,
) -> None:
    """Write a PNG of the learning rate against the step, shading warmup and decay phases."""
    lrs = schedule_table(total_steps, peak_lr, schedule, batch_tokens)
    phases = [schedule.phase(s, total_steps) for s in range(total_steps)]

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
        ax.set_title(title or f"{schedule.name} schedule, peak {peak_lr:g}, {total_steps} steps")
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
