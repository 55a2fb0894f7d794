"""The registry of scaling laws the fitter knows.

A law is one small definition: the table columns it reads, its parameters (with the space they
are fitted in, bounds and a grid of starting values), and a vectorised `predict` that evaluates
the law for many parameter vectors at once. The estimator (`testbed.fit.estimate`) knows
nothing about any particular law.

`predict(theta, x)` takes `theta` of shape (S, P) (S candidate parameter vectors, columns in the
order of `params`) and `x`, a dict of 1-D input arrays of length n, and returns (S, n): the
predicted log-loss for laws with `space == "log"` or the loss itself for `space == "raw"`.
An optional `jacobian(theta, x)` returns (S, n, P); without it the estimator differentiates
numerically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from testbed.errors import TestbedError


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


# ---------------------------------------------------------------- Chinchilla (Hoffmann et al.)
def _chinchilla_predict(theta, x):
    lse, _ = _softmax_lse(
        _col(theta, 0) - _col(theta, 3) * x["logN"],
        _col(theta, 1) - _col(theta, 4) * x["logD"],
        np.broadcast_to(_col(theta, 2), (theta.shape[0], x["logN"].size)),
    )
    return lse


def _chinchilla_jacobian(theta, x):
    _, (w_n, w_d, w_e) = _softmax_lse(
        _col(theta, 0) - _col(theta, 3) * x["logN"],
        _col(theta, 1) - _col(theta, 4) * x["logD"],
        np.broadcast_to(_col(theta, 2), (theta.shape[0], x["logN"].size)),
    )
    return np.stack([w_n, w_d, w_e, -w_n * x["logN"], -w_d * x["logD"]], axis=-1)


CHINCHILLA = Law(
    name="chinchilla",
    formula="L(N, D) = E + A / N^alpha + B / D^beta",
    inputs=("N", "D"),
    params=(
        Param("a", "A", True, (-5.0, 40.0), (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)),
        Param("b", "B", True, (-5.0, 40.0), (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)),
        Param("e", "E", True, (-5.0, 3.0), (-1.0, -0.5, 0.0, 0.5, 1.0)),
        Param("alpha", "alpha", False, (0.0, 3.0), (0.0, 0.5, 1.0, 1.5, 2.0)),
        Param("beta", "beta", False, (0.0, 3.0), (0.0, 0.5, 1.0, 1.5, 2.0)),
    ),
    space="log",
    predict=_chinchilla_predict,
    jacobian=_chinchilla_jacobian,
    variants=(Variant("free"), Variant("tied", tied={"beta": "alpha"}), Variant("fixed_E", fixed=("E",))),
    has_compute_frontier=True,
)


# ---------------------------------------------------------------- Kaplan et al. 2020
def _kaplan_terms(theta, x):
    ratio = _col(theta, 2) / _col(theta, 3)
    u_n = ratio * (_col(theta, 0) - x["logN"])
    u_d = np.broadcast_to(_col(theta, 1) - x["logD"], u_n.shape)
    return u_n, u_d


def _kaplan_predict(theta, x):
    lse, _ = _softmax_lse(*_kaplan_terms(theta, x))
    return _col(theta, 3) * lse


def _kaplan_jacobian(theta, x):
    u_n, u_d = _kaplan_terms(theta, x)
    lse, (w_n, w_d) = _softmax_lse(u_n, u_d)
    alpha_n, alpha_d = _col(theta, 2), _col(theta, 3)
    return np.stack(
        [alpha_n * w_n, alpha_d * w_d, w_n * (_col(theta, 0) - x["logN"]), lse - w_n * u_n], axis=-1
    )


KAPLAN = Law(
    name="kaplan",
    formula="L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D",
    inputs=("N", "D"),
    params=(
        Param("log_nc", "N_c", True, (0.0, 80.0), (10.0, 20.0, 30.0, 40.0)),
        Param("log_dc", "D_c", True, (0.0, 80.0), (10.0, 20.0, 30.0, 40.0)),
        Param("alpha_n", "alpha_N", False, (1e-4, 3.0), (0.05, 0.1, 0.3, 0.6)),
        Param("alpha_d", "alpha_D", False, (1e-4, 3.0), (0.05, 0.1, 0.3, 0.6)),
    ),
    space="log",
    predict=_kaplan_predict,
    jacobian=_kaplan_jacobian,
    has_compute_frontier=True,
)


# ---------------------------------------------------------------- power law with offset
def _power_terms(theta, x):
    return (
        _col(theta, 0) - _col(theta, 1) * x["logX"],
        np.broadcast_to(_col(theta, 2), (theta.shape[0], x["logX"].size)),
    )


def _power_predict(theta, x):
    return _softmax_lse(*_power_terms(theta, x))[0]


def _power_jacobian(theta, x):
    _, (w_x, w_e) = _softmax_lse(*_power_terms(theta, x))
    return np.stack([w_x, -w_x * x["logX"], w_e], axis=-1)


POWER = Law(
    name="power",
    formula="L(X) = E + A / X^alpha   (X: steps, tokens or compute)",
    inputs=("X",),
    params=(
        Param("a", "A", True, (-10.0, 60.0), (0.0, 5.0, 10.0, 20.0)),
        Param("alpha", "alpha", False, (0.0, 3.0), (0.1, 0.3, 0.6, 1.0)),
        Param("e", "E", True, (-8.0, 5.0), (-1.0, 0.0, 1.0)),
    ),
    space="log",
    predict=_power_predict,
    jacobian=_power_jacobian,
    variants=(Variant("free"), Variant("fixed_E", fixed=("E",))),
)


LAWS: dict[str, Law] = {}


def register(law: Law) -> Law:
    LAWS[law.name] = law
    return law


for _law in (CHINCHILLA, KAPLAN, POWER):
    register(_law)


def get_law(name: str) -> Law:
    # The laws defined in their own modules register themselves on import.
    from testbed.fit import annealing, datacon, vocab  # noqa: F401

    if name not in LAWS:
        raise TestbedError(f"--law {name!r} is unknown; use one of {', '.join(sorted(LAWS))}.")
    return LAWS[name]


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
