"""Checks that keep a fit's reported numbers within what its data support.

- The irreducible loss: the law's E never falls under its own bound or under the data's entropy
  (no model's loss goes below the entropy of the text it predicts).
- Extrapolation: a prediction more than EXTRAPOLATION_LIMIT beyond the fitted N, D or C is named,
  with how far.
- Prediction intervals: their coverage of the held-out points is compared with the nominal
  level, and their width with the actual error.
- Compute-optimal allocations outside the sampled model sizes or token counts, or with a loss
  below the data's entropy, are not reported as results.

Each check returns one-line messages that name the number and the fix; the caller puts them in
fit.json's `warnings` and on the console.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from testbed.errors import TestbedError
from testbed.fit.laws.base import Law

EXTRAPOLATION_LIMIT = 3.0  # a prediction this many times beyond the fitted N, D or C is named
COVERAGE_ALLOWANCE_SE = 2.0  # binomial standard errors of coverage tolerated below the nominal level
WIDTH_LIMIT = 10.0  # interval half-width over mean held-out error; calibrated normal errors give ~2.5
AXES = ("N", "D", "C")


def short(value: float) -> str:
    """11.5k, 2.79M, 1.2B: sizes as people say them."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


# ---------------------------------------------------------------- inputs the law cannot take
def refuse_nonpositive(law: Law, rows: pd.DataFrame, fitted: pd.DataFrame) -> None:
    """Refuse, with a count, the rows <= 0 in the law's `refuse_nonpositive` inputs among `rows`
    (a curve law: every logged row, its LR schedule) of the runs left in `fitted` (after --where)."""
    if not law.refuse_nonpositive or rows.empty:
        return
    if "run_id" in rows.columns and "run_id" in fitted.columns:
        rows = rows[rows["run_id"].isin(set(fitted["run_id"]))]
    for name in law.refuse_nonpositive:
        values = pd.to_numeric(rows[name], errors="coerce").to_numpy(float)
        bad = rows[values <= 0]
        if bad.empty:
            continue
        runs = sorted(map(str, bad["run_id"].unique())) if "run_id" in bad.columns else []
        shown = ", ".join(f"{v:g}" for v in sorted(set(values[values <= 0]))[:3])
        where = (f" in run(s) {', '.join(runs[:5])}{' and more' if len(runs) > 5 else ''}" if runs else "")
        leave = (f", or leave those runs out with --where \"run_id!='{runs[0]}'\"" if len(runs) == 1 else
                 ", or leave those runs out with --where" if runs else "")
        raise TestbedError(f"{len(bad)} rows have {name} <= 0 ({name}={shown}){where}; the {law.name} law "
                           f"needs {name} > 0 at every logged step (it raises the learning rate to a power and "
                           f"sums its area): fix the {name} column{leave}.")


# ---------------------------------------------------------------- the irreducible loss
def public_bounds(law: Law, name: str, bounds: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """A parameter's bounds in reported units: --bounds where given, else the law's."""
    if name in bounds:
        return bounds[name]
    param = law.param(name)
    return param.to_public(param.bounds[0]), param.to_public(param.bounds[1])


def floor_bounds(law: Law, bounds: dict[str, tuple[float, float]], floor: float | None
                 ) -> dict[str, tuple[float, float]]:
    """`bounds` with the law's irreducible loss (E) bounded below by the data's entropy."""
    if floor is None or law.floor is None:
        return bounds
    low, high = public_bounds(law, law.floor, bounds)
    if high <= floor:
        raise TestbedError(f"the upper bound of {law.floor} ({high:.4g}) is at or below the data's entropy "
                           f"({floor:.4g}), which the loss cannot go under; raise it with --bounds "
                           f"{law.floor}={floor:.4g}:{max(10 * floor, high):.4g}.")
    return {**bounds, law.floor: (max(low, floor), high)}


def fixed_floor_problem(law: Law, fixed: dict[str, float], bounds: dict[str, tuple[float, float]],
                        floor: float | None, fitted: bool = False) -> str | None:
    """Why a fixed value is impossible (below the law's bound for it, or an irreducible loss below
    the data's entropy), or None. `fitted`: the value is a floor fitted to the points (--variant
    auto), which the user cannot change, so the message says the variant is left out instead."""
    publics = {p.public for p in law.params}
    for name, value in fixed.items():
        if name not in publics:
            continue
        if name == law.floor and floor is not None and value < floor * (1 - 1e-9):
            return (f"{name}={value:.4g} is below the data's entropy ({floor:.4g}), which the loss cannot go "
                    f"under; give {name} >= {floor:.4g}, or leave --fix {name} out to use the entropy")
        low, _ = public_bounds(law, name, bounds)
        if value < low * (1 - 1e-9):
            fix = ("the points show no floor the law allows, so this variant is left out" if fitted else
                   f"give a larger value or widen the bound with --bounds {name}=LOW:HIGH")
            return f"{name}={value:.4g} is below the law's bound for {name} ({low:.4g}); {fix}"
    return None


# ---------------------------------------------------------------- extrapolation
def extrapolation(train: pd.DataFrame, targets: dict[str, np.ndarray], what: str, fix: str) -> list[str]:
    """One line per axis where `targets` lie more than EXTRAPOLATION_LIMIT beyond the fitted
    range (above its largest value or below its smallest)."""
    out = []
    for axis in AXES:
        if axis not in targets or axis not in train.columns:
            continue
        fitted = pd.to_numeric(train[axis], errors="coerce").to_numpy(float)
        fitted = fitted[np.isfinite(fitted) & (fitted > 0)]
        target = np.asarray(targets[axis], float)
        target = target[np.isfinite(target) & (target > 0)]
        if not len(fitted) or not len(target):
            continue
        above, below = target.max() / fitted.max(), fitted.min() / target.min()
        if above > EXTRAPOLATION_LIMIT:
            out.append(f"{what} {axis} is {above:.1f}x the largest fitted {axis} ({target.max():.3g} vs "
                       f"{fitted.max():.3g}), more than {EXTRAPOLATION_LIMIT:g}x beyond the data: an "
                       f"extrapolation; {fix}.")
        elif below > EXTRAPOLATION_LIMIT:
            out.append(f"{what} {axis} is {below:.1f}x below the smallest fitted {axis} ({target.min():.3g} vs "
                       f"{fitted.min():.3g}), more than {EXTRAPOLATION_LIMIT:g}x beyond the data: an "
                       f"extrapolation; {fix}.")
    return out


# ---------------------------------------------------------------- prediction intervals
def calibration(rows: list[dict], held: pd.DataFrame, level: float) -> tuple[dict, list[str]]:
    """Coverage of the held-out points by their prediction intervals against the nominal
    `level`, and the intervals' half-width against the actual error.

    The allowance below `level` is COVERAGE_ALLOWANCE_SE binomial standard errors,
    sqrt(level (1 - level) / n), with n the held-out runs rather than points: the checkpoints
    of one run share its error, so they are not independent draws."""
    inside = np.array([row["inside"] for row in rows], bool)
    n_runs = max(1, int(held["run_id"].nunique()))
    coverage = float(inside.mean())
    allowance = COVERAGE_ALLOWANCE_SE * math.sqrt(level * (1 - level) / n_runs)
    loss = np.array([row["loss"] for row in rows], float)
    half = float(np.median(np.array([(row["pi_high"] - row["pi_low"]) / 2 for row in rows]) / loss))
    error = float(np.mean([abs(row["rel_error"]) for row in rows]))
    ratio = float(half / error) if error > 0 else float("inf")
    record = {"coverage": coverage, "inside": int(inside.sum()), "points": int(len(inside)), "runs": n_runs,
              "allowance": allowance, "allowance_se": COVERAGE_ALLOWANCE_SE, "coverage_floor": max(0.0, level - allowance),
              "median_half_width": float(half), "width_over_error": ratio}
    warnings = []
    if coverage < level - allowance:
        warnings.append(
            f"the {level:.0%} prediction intervals hold {inside.sum()} of {len(inside)} held-out points "
            f"({coverage:.0%}), below {level:.0%} minus {COVERAGE_ALLOWANCE_SE:g} binomial standard errors over "
            f"{n_runs} held-out run(s) ({level - allowance:.0%}): the extrapolation is biased beyond its "
            f"intervals; check the law or variant on the held-out error before using its predictions.")
    if ratio > WIDTH_LIMIT:
        warnings.append(
            f"the {level:.0%} prediction intervals are {ratio:.0f}x wider than the held-out error (median "
            f"half-width {half:.2%} vs mean error {error:.3%}; calibrated intervals are about 2.5x): they "
            f"understate the fit's accuracy; judge it by the held-out error, or add runs to narrow them.")
    return record, warnings


# ---------------------------------------------------------------- compute-optimal allocation
def allocation_outside(train: pd.DataFrame, alloc: dict[str, np.ndarray], floor: float | None,
                       floor_source: str) -> dict[float, str]:
    """Budget -> why its compute-optimal allocation is not a result: N_opt outside the sampled
    model sizes, D_opt outside the sampled token counts, or a loss below the data's entropy."""
    ranges = {axis: (float(train[axis].min()), float(train[axis].max())) for axis in ("N", "D")
              if axis in train.columns}
    words = {"N": ("sizes", "run"), "D": ("token counts", "run's")}
    out = {}
    for i, budget in enumerate(alloc["C"]):
        why = None
        for axis in ("N", "D"):
            if axis not in ranges:
                continue
            value, (low, high) = float(alloc[f"{axis}_opt"][i]), ranges[axis]
            noun, owner = words[axis]
            if value < low * (1 - 1e-6):
                why = f"outside the sampled {noun} ({axis}_opt {short(value)} < smallest {owner} {short(low)})"
            elif value > high * (1 + 1e-6):
                why = f"outside the sampled {noun} ({axis}_opt {short(value)} > largest {owner} {short(high)})"
            if why:
                break
        loss = float(alloc["loss"][i])
        if why is None and floor is not None and loss < floor:
            why = f"its loss {loss:.4g} is below {floor_source}, {floor:.4g}, which no model reaches"
        if why:
            out[float(budget)] = why
    return out


def bracket_warnings(train: pd.DataFrame) -> list[str]:
    """IsoFLOP data whose lowest loss per budget sits at the smallest (or largest) model of the
    budget: the sampled sizes do not bracket the optimum, so no fit can place it from them."""
    from testbed.fit.protocols.approaches import isoflop_groups

    if not {"N", "C", "loss"} <= set(train.columns):
        return []
    labels = isoflop_groups(train["C"].to_numpy(float))
    edges: dict[str, list[float]] = {"smallest": [], "largest": []}
    budgets = 0
    for label in np.unique(labels):
        group = train[labels == label]
        if group["N"].nunique() < 3:
            continue
        budgets += 1
        best = group["N"].iloc[int(np.argmin(group["loss"].to_numpy(float)))]
        if best == group["N"].min():
            edges["smallest"].append(best)
        elif best == group["N"].max():
            edges["largest"].append(best)
    out = []
    for side, found in edges.items():
        if found:
            more = "smaller" if side == "smallest" else "larger"
            out.append(f"at {len(found)} of {budgets} compute budgets the lowest loss is the {side} model "
                       f"({', '.join(sorted({short(n) for n in found}))}): the sampled sizes do not bracket the "
                       f"optimum; add {more} models at those budgets.")
    return out
