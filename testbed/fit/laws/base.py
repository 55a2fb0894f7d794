"""What a scaling law is, and the registry of them (`LAWS`).

Each law module (classic.py for Chinchilla, Kaplan and the power law; annealing.py, multipower.py,
datacon.py, farseer.py, vocab.py; or a user's module passed to `testbed fit --import`, through
`testbed.fit.laws`) imports this module and registers its `Law`; the package's __init__ imports
every built-in law module once.

A law is one small definition: the table columns it reads, its parameters (with the space they
are fitted in, bounds and a grid of starting values), and a vectorised `predict` that evaluates
the law for many parameter vectors at once. The estimator (`testbed.fit.estimation.estimate`) knows
nothing about any particular law.

`predict(theta, x)` takes `theta` of shape (S, P) (S candidate parameter vectors, columns in the
order of `params`) and `x`, a dict of 1-D input arrays of length n, and returns (S, n): the
predicted log-loss for laws with `space == "log"` or the loss itself for `space == "raw"`.
An optional `jacobian(theta, x)` returns (S, n, P); without it the estimator differentiates
numerically.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from testbed.errors import TestbedError
from testbed.registry import Registry


@dataclass(frozen=True)
class Param:
    """One fitted parameter: `name` is what the optimiser sees, `public` what reports show."""

    name: str
    public: str
    log: bool  # fitted as log(public value), so positivity holds and scales are comparable
    bounds: tuple[float, float]
    grid: tuple[float, ...]

    def to_public(self, value: float) -> float:
        return float(np.exp(value)) if self.log else float(value)

    def to_internal(self, value: float) -> float:
        if self.log:
            if not value > 0:
                raise TestbedError(
                    f"fixed parameter {self.public}={value} must be positive; give a value > 0."
                )
            return float(np.log(value))
        return float(value)


@dataclass(frozen=True)
class Variant:
    """A constrained form of a law: parameters tied to others or fixed to a given value."""

    name: str
    tied: dict[str, str] = field(default_factory=dict)  # internal name -> internal name
    fixed: tuple[str, ...] = ()  # public names whose values the user or the data supply


@dataclass(frozen=True)
class Law:
    name: str
    formula: str
    inputs: tuple[str, ...]
    params: tuple[Param, ...]
    space: str  # "log": residual = log(loss) - predict ; "raw": residual = loss - predict
    predict: Callable[[np.ndarray, dict], np.ndarray]
    jacobian: Callable[[np.ndarray, dict], np.ndarray] | None = None
    variants: tuple[Variant, ...] = (Variant("free"),)
    has_compute_frontier: bool = False  # inputs include N and D, so C = 6ND allocations exist
    # frame -> predict's inputs, for laws whose inputs are not plain columns (e.g. LR areas)
    prepare: Callable | None = None
    positive: tuple[str, ...] | None = None  # columns that must be > 0 (default: inputs + loss)
    # inputs whose rows <= 0 are refused with a count rather than dropped: dropping a row would
    # change what the rows around it mean (a learning rate sums into its curve's LR area)
    refuse_nonpositive: tuple[str, ...] = ()
    # input -> the term that input identifies: the fit needs two or more distinct values of it
    terms: dict[str, str] = field(default_factory=dict)
    # fitted to whole loss curves (run_id, step, lr, loss): a sweep directory is read per step
    curves: bool = False
    # batched Levenberg-Marquardt iterations for the best starts before L-BFGS-B polishes them: a
    # law with many correlated parameters (farseer) needs more, or L-BFGS-B crawls along its ridges
    refine_iterations: int = 60
    # the public parameter that is the loss approached with unlimited N and D (E): the data's
    # entropy bounds it from below, since no model's loss falls under its data's entropy
    floor: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def param(self, name_or_public: str) -> Param:
        for p in self.params:
            if name_or_public in (p.name, p.public):
                return p
        known = ", ".join(p.public for p in self.params)
        raise TestbedError(
            f"law {self.name!r} has no parameter {name_or_public!r}; use one of {known}."
        )

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.variants)
        raise TestbedError(f"--variant {name!r} is unknown for law {self.name!r}; use one of {known}.")

    def public(self, theta: np.ndarray) -> dict[str, float]:
        return {p.public: p.to_public(v) for p, v in zip(self.params, np.asarray(theta).ravel())}

    def predict_loss(self, theta: np.ndarray, x: dict) -> np.ndarray:
        """The loss itself (not its log) for one parameter vector."""
        out = self.predict(np.atleast_2d(theta), x)[0]
        return np.exp(out) if self.space == "log" else out


def _col(theta: np.ndarray, i: int) -> np.ndarray:
    return theta[:, i : i + 1]


def _softmax_lse(*terms: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """log(sum(exp(terms))) and the softmax weights, computed stably."""
    top = np.maximum.reduce(terms)
    exps = [np.exp(t - top) for t in terms]
    total = sum(exps)
    return top + np.log(total), [e / total for e in exps]


# A law is an instance, so its origin is where its predict function is defined: a module imported
# again re-registers its own law, while another law under a taken name is an error.
LAWS = Registry("law", "--law", origin=lambda law: (law.predict.__module__, law.predict.__qualname__))


def register(law: Law) -> Law:
    """Register `law` under its name (a different law under a taken name is an error)."""
    return LAWS.register(law.name)(law)


def get_law(name: str) -> Law:
    """The law registered as `name` (the built-ins once testbed.fit.laws is imported)."""
    if name not in LAWS:
        near = difflib.get_close_matches(str(name), LAWS.names(), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise TestbedError(f"--law {name!r} is unknown; {hint}use one of {', '.join(LAWS.names())}, "
                           f"or define it in a module and pass --import MODULE.")
    return LAWS.get(name)


def law_inputs(law: Law, frame) -> dict[str, np.ndarray]:
    """The inputs of `law` for the rows of a table (a DataFrame or a dict of columns)."""
    if law.prepare is not None:
        return law.prepare(frame)
    return features(law, {name: np.asarray(frame[name], dtype=float) for name in law.inputs})


def needed_columns(law: Law) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(columns that must be numbers, columns that must be positive) for this law's table."""
    needed = tuple(law.inputs) + ("loss",)
    positive = law.positive if law.positive is not None else (
        needed if law.space == "log" else tuple(law.inputs)
    )
    return needed, positive


def features(law: Law, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays a law's predict reads: each input plus its natural log as `log<name>`."""
    x = {}
    for name in law.inputs:
        values = np.asarray(columns[name], dtype=float)
        x[name] = values
        with np.errstate(divide="ignore", invalid="ignore"):
            x["log" + name] = np.log(values)
    return x


def curve_runs(frame):
    """(row indices, logged steps, logged learning rates) for each run of a table of curves
    (run_id, step, lr). A run's LR history is its `schedule` column when present (its whole
    logged curve, attached before rows were filtered, so dropping early checkpoints does not drop
    the warmup from the schedule), else its own rows."""
    run_ids = np.asarray(frame["run_id"])
    steps, lrs = np.asarray(frame["step"], float), np.asarray(frame["lr"], float)
    schedules = list(frame["schedule"]) if "schedule" in frame else None
    codes, _ = pd.factorize(run_ids)
    for code in range(codes.max() + 1 if len(codes) else 0):
        idx = np.flatnonzero(codes == code)
        if schedules is not None and isinstance(schedules[idx[0]], tuple):
            yield idx, *schedules[idx[0]]
        else:
            yield idx, steps[idx], lrs[idx]
