"""Step 2 of the task laws (OLMo model ladder, Bhagia et al. 2024): a task's accuracy against its
task loss, Acc(L) = a / (1 + exp(-k (L - L0))) + b.

L is the task loss (bits per byte of the correct answer, `task/<name>/bpb`); step 1 predicts it
from (N, D) or C with a classic law (testbed/fit/tasks.py chains the two). b is the accuracy of a
model that knows nothing (the chance level, fixed when known), a + b the accuracy approached as
the task loss falls, L0 the loss half-way between and k < 0 how steep the rise is.

Fitted by least squares (scipy.optimize.least_squares) from a small grid of starts, with box
bounds in a reparameterisation that keeps a + b <= 1: u = a / (1 - b) in [0, 1], b in [0, 1).
Not a `Law` of the registry: its input is a measured loss, not a model size or token count, and
the generic fitter's Huber objective on log-loss does not apply to accuracies.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from testbed.errors import TestbedError

FORMULA = "Acc(L) = a / (1 + exp(-k (L - L0))) + b"
PARAMS = ("a", "k", "L0", "b")
K_SPAN_MAX = 200.0  # |k| times the spread of the fitted losses: steeper is a step, not a sigmoid
AT_BOUND_TOL = 1e-3


def free_count(chance: float | None) -> int:
    """Fitted parameters of the sigmoid: a, k, L0 and b, or three when b is the known chance level."""
    return 3 if chance is not None else 4


def min_points(chance: float | None) -> int:
    """The fewest points the sigmoid is fitted to: one more than its free parameters, so a
    residual is left to measure the noise by."""
    return free_count(chance) + 1


def sigmoid(theta: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Acc for parameter rows `theta` (S, 4) or (4,) in public order (a, k, L0, b) at `loss`:
    (S, n) or (n,); a 1-D theta with a 2-D loss (S, n) gives (S, n) too."""
    theta = np.asarray(theta, float)
    flat = theta.ndim == 1
    t = np.atleast_2d(theta)
    a, k, l0, b = (t[:, i : i + 1] for i in range(4))
    with np.errstate(over="ignore"):
        out = a / (1.0 + np.exp(-k * (np.asarray(loss, float) - l0))) + b
    return out[0] if flat and np.ndim(loss) <= 1 else out


@dataclass
class SigmoidFit:
    theta: np.ndarray  # public (a, k, L0, b)
    chance: float | None  # b fixed to this chance level, or None when fitted
    n_points: int
    residuals: np.ndarray  # observed - fitted accuracy
    converged: bool
    at_bound: list[str] = field(default_factory=list)
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)  # internal (u, k, L0, b)

    @property
    def params(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(PARAMS, self.theta)}

    @property
    def n_free(self) -> int:
        return free_count(self.chance)

    def predict(self, loss: np.ndarray) -> np.ndarray:
        return np.asarray(sigmoid(self.theta, np.asarray(loss, float)), float).reshape(np.shape(loss))


def _public(q: np.ndarray) -> np.ndarray:
    u, k, l0, b = q
    return np.array([u * (1.0 - b), k, l0, b])


def _internal_bounds(loss: np.ndarray, chance: float | None) -> dict[str, tuple[float, float]]:
    span = max(float(np.ptp(loss)), 0.05 * float(np.mean(np.abs(loss))), 1e-6)
    out = {"u": (0.0, 1.0), "k": (-K_SPAN_MAX / span, 0.0),
           "L0": (float(loss.min()) - 3 * span, float(loss.max()) + 3 * span), "b": (0.0, 0.999)}
    if chance is not None:
        out.pop("b")
    return out


def fit_sigmoid(loss, acc, *, chance: float | None = None, start: np.ndarray | None = None) -> SigmoidFit:
    """Least-squares fit of Acc(L) to accuracies `acc` at task losses `loss`. `chance` fixes b
    (the accuracy of guessing: 0.25 for four choices); `start` (public a, k, L0, b, e.g. the
    full-data optimum for a bootstrap replicate) skips the grid of starts."""
    loss, acc = np.asarray(loss, float), np.asarray(acc, float)
    if chance is not None and not 0.0 <= chance < 1.0:
        raise TestbedError(f"--chance {chance} is outside [0, 1); give the accuracy of guessing, e.g. 0.25 "
                           f"for four choices.")
    need = min_points(chance)
    if loss.size < need:
        raise TestbedError(f"the accuracy sigmoid {FORMULA} has {free_count(chance)} free parameters but only "
                           f"{loss.size} points; give at least {need} (runs or checkpoints with both the task's "
                           f"bpb and accuracy){'' if chance is not None else ', or fix b with --chance'}.")
    bounds = _internal_bounds(loss, chance)
    names = list(bounds)
    lower = np.array([bounds[n][0] for n in names])
    upper = np.array([bounds[n][1] for n in names])

    def full(free: np.ndarray) -> np.ndarray:
        return np.append(free, chance) if chance is not None else free

    def residuals(free: np.ndarray) -> np.ndarray:
        return sigmoid(_public(full(free)), loss) - acc

    def jacobian(free: np.ndarray) -> np.ndarray:
        u, k, l0, b = full(free)
        with np.errstate(over="ignore"):
            s = 1.0 / (1.0 + np.exp(-k * (loss - l0)))
        a, ds = u * (1 - b), s * (1 - s)
        cols = [(1 - b) * s, a * ds * (loss - l0), -a * ds * k]
        if chance is None:
            cols.append(1.0 - u * s)
        return np.stack(cols, axis=1)

    if start is not None:
        a, k, l0, b = np.asarray(start, float)
        starts = [np.array([a / (1 - b) if b < 1 else 1.0, k, l0] + ([] if chance is not None else [b]))]
    else:
        span = bounds["k"][1] - bounds["k"][0]
        ks = [-span * f / K_SPAN_MAX for f in (2.0, 5.0, 10.0, 20.0)]
        l0s = list(np.quantile(loss, [0.0, 0.25, 0.5, 0.75, 1.0]))
        us = [0.5, 0.9]
        bs = [] if chance is not None else [max(0.0, float(acc.min()) - 0.05), 0.0]
        starts = [np.array([u, k, l0, *([b] if chance is None else [])])
                  for u, k, l0, b in itertools.product(us, ks, l0s, bs or [0.0])]
    best = None
    for s0 in starts:
        s0 = np.clip(s0, lower + 1e-9 * (upper - lower), upper - 1e-9 * (upper - lower))
        try:
            res = least_squares(residuals, s0, jac=jacobian, bounds=(lower, upper), method="trf",
                                x_scale="jac", max_nfev=200)
        except (ValueError, np.linalg.LinAlgError):
            continue
        if not np.isfinite(res.cost):
            continue
        if best is None or res.cost < best.cost:
            best = res
    if best is None:
        raise TestbedError("the accuracy sigmoid could not be evaluated at any start; check that the task's "
                           "bpb and accuracy columns hold finite numbers.")
    q = full(best.x)
    at_bound = [("a" if n == "u" else n) for j, n in enumerate(names)
                if min(best.x[j] - lower[j], upper[j] - best.x[j]) <= AT_BOUND_TOL * (upper[j] - lower[j])]
    theta = _public(q)
    return SigmoidFit(theta=theta, chance=chance, n_points=int(loss.size), residuals=acc - sigmoid(theta, loss),
                      converged=bool(best.status > 0), at_bound=at_bound, bounds=bounds)
