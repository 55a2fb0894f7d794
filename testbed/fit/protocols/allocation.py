"""Compute-optimal allocation from a fitted L(N, D), with C = 6·N·D.

Found numerically (a dense grid in log N refined by a parabola through the three best points)
so it works for any law with N and D inputs; for Chinchilla's form it agrees with the closed
form N_opt = G·(C/6)^(beta/(alpha+beta)), G = (alpha·A / (beta·B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import numpy as np

from testbed.fit.laws import Law, features

_GRID = np.linspace(0.02, 0.98, 2401)  # log N as a fraction of log(C/6)


def optimal_allocation(law: Law, theta: np.ndarray, budgets) -> dict[str, np.ndarray]:
    """N_opt, D_opt, tokens per parameter and the minimal loss at each compute budget C."""
    budgets = np.atleast_1d(np.asarray(budgets, dtype=float))
    log_half = np.log(budgets / 6.0)[:, None]
    log_n = log_half * _GRID[None, :]
    log_d = log_half - log_n
    x = features(law, {"N": np.exp(log_n).ravel(), "D": np.exp(log_d).ravel()})
    pred = law.predict(np.atleast_2d(theta), x)[0].reshape(log_n.shape)
    pred = np.where(np.isfinite(pred), pred, np.inf)
    best = np.clip(np.argmin(pred, axis=1), 1, len(_GRID) - 2)
    rows = np.arange(len(budgets))
    y0, y1, y2 = pred[rows, best - 1], pred[rows, best], pred[rows, best + 1]
    curvature = y0 - 2 * y1 + y2
    shift = np.where(curvature > 0, 0.5 * (y0 - y2) / np.where(curvature > 0, curvature, 1.0), 0.0)
    step = log_n[:, 1] - log_n[:, 0]
    log_n_opt = log_n[rows, best] + np.clip(shift, -1, 1) * step
    n_opt = np.exp(log_n_opt)
    d_opt = budgets / (6.0 * n_opt)
    loss = law.predict_loss(theta, features(law, {"N": n_opt, "D": d_opt}))
    return {"C": budgets, "N_opt": n_opt, "D_opt": d_opt, "tokens_per_param": d_opt / n_opt, "loss": loss}


def frontier_exponents(law: Law, theta: np.ndarray, c_low: float, c_high: float) -> dict[str, float]:
    """a and b in N_opt ∝ C^a, D_opt ∝ C^b, as the slopes between two budgets."""
    alloc = optimal_allocation(law, theta, [c_low, c_high])
    span = np.log(c_high / c_low)
    return {
        "a": float(np.log(alloc["N_opt"][1] / alloc["N_opt"][0]) / span),
        "b": float(np.log(alloc["D_opt"][1] / alloc["D_opt"][0]) / span),
    }


def derived_quantities(law: Law, theta: np.ndarray, budgets) -> dict[str, float]:
    """Named scalars with bootstrap intervals: exponents and the allocation at each budget."""
    out: dict[str, float] = {}
    params = law.public(theta)
    if law.name == "chinchilla":
        total = params["alpha"] + params["beta"]
        out["a"] = params["beta"] / total if total > 0 else float("nan")
        out["b"] = params["alpha"] / total if total > 0 else float("nan")
    else:
        budgets_sorted = np.sort(np.atleast_1d(budgets))
        out.update(frontier_exponents(law, theta, budgets_sorted[0] / 10, budgets_sorted[-1] * 10))
    alloc = optimal_allocation(law, theta, budgets)
    for i, c in enumerate(alloc["C"]):
        tag = f"{c:.2g}"
        out[f"N_opt@C={tag}"] = float(alloc["N_opt"][i])
        out[f"D_opt@C={tag}"] = float(alloc["D_opt"][i])
        out[f"tokens_per_param@C={tag}"] = float(alloc["tokens_per_param"][i])
        out[f"loss@C={tag}"] = float(alloc["loss"][i])
    return out
