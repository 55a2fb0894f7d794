"""Chinchilla's Approaches 1 and 2: compute-optimal N and D straight from the points.

Approach 1: within bins of compute, the lowest-loss point gives N_opt(C); regress log N_opt on
log C. Approach 2 (IsoFLOP): points sharing a compute budget lie on a curve of loss against
log N; a parabola through each gives its minimum N_opt(C). Both report N_opt ∝ C^a and
D_opt ∝ C^b with D = C / (6 N).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd


def _polyfit(x: np.ndarray, y: np.ndarray, degree: int) -> np.ndarray:
    """np.polyfit without its RankWarning: callers check that x holds enough distinct values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", np.exceptions.RankWarning)
        return np.polyfit(x, y, degree)


def _power_fit(compute: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    if len(np.unique(compute)) < 2:
        return float("nan"), float("nan")
    slope, intercept = _polyfit(np.log(compute), np.log(values), 1)
    return float(slope), float(np.exp(intercept))


def isoflop_groups(compute: np.ndarray, gap: float = 0.1) -> np.ndarray:
    """Group labels for budgets: a new group starts where log10 C jumps by more than `gap`."""
    order = np.argsort(compute)
    log_c = np.log10(compute[order])
    labels_sorted = np.concatenate([[0], np.cumsum(np.diff(log_c) > gap)])
    labels = np.empty(len(compute), dtype=int)
    labels[order] = labels_sorted
    return labels


def approach2(frame: pd.DataFrame, min_points: int = 4) -> dict | None:
    """IsoFLOP parabolas; None when fewer than three budgets have a usable minimum."""
    compute = frame["C"].to_numpy(float)
    labels = isoflop_groups(compute)
    minima = []
    for label in np.unique(labels):
        group = frame[labels == label]
        log_n = np.log(group["N"].to_numpy(float))
        if len(group) < min_points or np.ptp(log_n) < 0.1 or len(np.unique(log_n)) < 3:
            continue
        c2, c1, c0 = _polyfit(log_n, group["loss"].to_numpy(float), 2)
        if c2 <= 0:
            continue
        vertex = -c1 / (2 * c2)
        if not log_n.min() <= vertex <= log_n.max():
            continue  # the minimum is extrapolated, not observed: skip this budget
        budget = float(np.exp(np.log(group["C"].to_numpy(float)).mean()))
        n_opt = float(np.exp(vertex))
        minima.append({"C": budget, "N_opt": n_opt, "D_opt": budget / (6 * n_opt),
                       "loss": float(c0 + c1 * vertex + c2 * vertex**2), "curve": (c2, c1, c0)})
    if len(minima) < 3:
        return None
    table = pd.DataFrame(minima)
    a, n_coef = _power_fit(table["C"].to_numpy(), table["N_opt"].to_numpy())
    b, d_coef = _power_fit(table["C"].to_numpy(), table["D_opt"].to_numpy())
    return {"a": a, "b": b, "N_coef": n_coef, "D_coef": d_coef, "minima": minima}


def approach1(frame: pd.DataFrame, n_bins: int | None = None) -> dict | None:
    """Lowest-loss point per compute bin; None when fewer than three bins hold points."""
    compute = frame["C"].to_numpy(float)
    n_bins = n_bins or int(min(12, max(3, len(frame) // 4)))
    edges = np.linspace(np.log(compute.min()), np.log(compute.max()) + 1e-9, n_bins + 1)
    which = np.clip(np.digitize(np.log(compute), edges) - 1, 0, n_bins - 1)
    best = []
    for k in range(n_bins):
        group = frame[which == k]
        if len(group):
            row = group.iloc[int(np.argmin(group["loss"].to_numpy()))]
            best.append({"C": float(row["C"]), "N_opt": float(row["N"]), "D_opt": float(row["C"]) / (6 * float(row["N"])),
                         "loss": float(row["loss"])})
    if len(best) < 3:
        return None
    table = pd.DataFrame(best)
    a, n_coef = _power_fit(table["C"].to_numpy(), table["N_opt"].to_numpy())
    b, d_coef = _power_fit(table["C"].to_numpy(), table["D_opt"].to_numpy())
    return {"a": a, "b": b, "N_coef": n_coef, "D_coef": d_coef, "minima": best}
