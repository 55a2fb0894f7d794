"""Compare variants of an ablation through their fitted laws.

The compute multiplier of a variant at budget C is C_base / C, where C_base is the compute the
baseline needs for its compute-optimal loss to equal the variant's compute-optimal loss at C.
Above 1 the variant is more compute-efficient. Where the multiplier crosses 1 the curves cross.
"""

from __future__ import annotations

import numpy as np

from testbed.fit.allocation import optimal_allocation
from testbed.fit.laws import Law

_SPAN = np.linspace(-30.0, 30.0, 601)  # log C offsets searched for the matching baseline budget


def compute_multiplier(law: Law, baseline: np.ndarray, variant: np.ndarray, budgets) -> np.ndarray:
    budgets = np.atleast_1d(np.asarray(budgets, float))
    target = optimal_allocation(law, variant, budgets)["loss"]
    out = np.empty(len(budgets))
    for i, c in enumerate(budgets):
        log_c = np.log(c) + _SPAN
        frontier = optimal_allocation(law, baseline, np.exp(log_c))["loss"]
        # The frontier falls with compute; interpolate log C at the variant's loss.
        if target[i] < frontier.min():
            out[i] = np.inf
        elif target[i] > frontier.max():
            out[i] = 0.0
        else:
            order = np.argsort(frontier)
            out[i] = np.exp(np.interp(target[i], frontier[order], log_c[order]) - np.log(c))
    return out


def crossings(law: Law, baseline: np.ndarray, variant: np.ndarray, c_low: float, c_high: float) -> list[float]:
    """Budgets in [c_low, c_high] where the variant's advantage changes sign."""
    budgets = np.exp(np.linspace(np.log(c_low), np.log(c_high), 61))
    gain = optimal_allocation(law, baseline, budgets)["loss"] - optimal_allocation(law, variant, budgets)["loss"]
    flips = np.nonzero(np.sign(gain[:-1]) * np.sign(gain[1:]) < 0)[0]
    points = []
    for k in flips:
        w = gain[k] / (gain[k] - gain[k + 1])
        points.append(float(np.exp(np.log(budgets[k]) + w * (np.log(budgets[k + 1]) - np.log(budgets[k])))))
    return points
