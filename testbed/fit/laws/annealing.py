"""The learning-rate annealing law of Tissue et al. 2024, fitted over whole loss curves.

L(s) = L0 + A·S1(s)^(-alpha) - C·S2(s), where for the per-step learning rates lr_1..lr_s
  S1(s) = sum_i lr_i                                   (forward area: progress at any LR)
  S2(s) = sum_i m_i,  m_i = lambda·m_(i-1) + (lr_(i-1) - lr_i)   (annealing area, with momentum)
and lambda = 0.999. Because the schedule enters only through S1 and S2, a fit on some schedules
(e.g. constant and cosine) predicts the whole curve of another (e.g. WSD).

Rows are points of curves: run_id, step, lr, loss. The learning rate of the steps between
logged rows is interpolated linearly, so logging every k steps is enough; a run's whole logged
schedule (base.curve_runs) is used even where the fit keeps only some of its rows.
"""

from __future__ import annotations

import numpy as np

from testbed.fit.laws.base import Law, Param, curve_runs, register

DECAY = 0.999


def lr_areas(steps, lrs, at_steps, decay: float = DECAY) -> tuple[np.ndarray, np.ndarray]:
    """S1 and S2 of one run at `at_steps`, from its logged (step, lr) pairs."""
    steps = np.asarray(steps, float)
    order = np.argsort(steps)
    steps, lrs = steps[order], np.asarray(lrs, float)[order]
    last = int(np.max(at_steps))
    grid = np.arange(1, last + 1)
    lr = np.interp(grid, steps, lrs)
    drops = np.concatenate([[0.0], lr[:-1] - lr[1:]])
    # m_i = decay·m_(i-1) + drop_i is a first-order linear filter; scipy runs it in C.
    from scipy.signal import lfilter

    momentum = lfilter([1.0], [1.0, -decay], drops)
    s1 = np.cumsum(lr)
    s2 = np.cumsum(momentum)
    idx = np.clip(np.asarray(at_steps, int), 1, last) - 1
    return s1[idx], s2[idx]


def _prepare(frame) -> dict:
    at_steps = np.asarray(frame["step"], float)
    s1 = np.empty(len(at_steps))
    s2 = np.empty(len(at_steps))
    for idx, steps, lrs in curve_runs(frame):
        s1[idx], s2[idx] = lr_areas(steps, lrs, at_steps[idx].astype(int))
    return {"S1": s1, "S2": s2, "logS1": np.log(np.maximum(s1, 1e-300))}


def _predict(theta, x):
    log_l0, log_a, alpha, log_c = (theta[:, i : i + 1] for i in range(4))
    value = np.exp(log_l0) + np.exp(log_a - alpha * x["logS1"]) - np.exp(log_c) * x["S2"]
    return np.log(np.maximum(value, 1e-300))


ANNEALING = register(Law(
    name="annealing",
    formula="L(s) = L0 + A * S1^(-alpha) - C * S2   (S1 = sum lr, S2 = annealing momentum area, lambda = 0.999)",
    inputs=("step", "lr"),
    params=(
        Param("log_l0", "L0", True, (-8.0, 5.0), (0.0, 0.7, 1.4)),
        Param("log_a", "A", True, (-20.0, 20.0), (-1.0, 0.5, 2.0)),
        Param("alpha", "alpha", False, (1e-3, 3.0), (0.2, 0.5, 1.0)),
        Param("log_c", "C", True, (-20.0, 20.0), (-3.0, -1.0, 1.0)),
    ),
    space="log",
    predict=_predict,
    prepare=_prepare,
    positive=("step", "loss"),
    curves=True,
))


def predict_curve(theta: np.ndarray, steps, lrs, at_steps=None) -> np.ndarray:
    """The law's loss curve for a schedule given as per-step (or logged) learning rates."""
    at_steps = np.asarray(steps if at_steps is None else at_steps)
    s1, s2 = lr_areas(steps, lrs, at_steps)
    return ANNEALING.predict_loss(theta, {"S1": s1, "S2": s2, "logS1": np.log(s1)})
