"""Variants of an ablation (`--by COLUMN`): a law fitted per variant, each compared with the baseline.

The compute multiplier of a variant at budget C is C_base / C, where C_base is the compute the
baseline needs for its compute-optimal loss to equal the variant's compute-optimal loss at C.
Above 1 the variant is more compute-efficient. Where the multiplier crosses 1 the curves cross.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from testbed.errors import TestbedError
from testbed.fit.estimation import guards
from testbed.fit.estimation.bootstrap import replicate_thetas
from testbed.fit.estimation.estimate import fit
from testbed.fit.laws import Law, law_inputs
from testbed.fit.options import Analysis, FitSummary, constraints_for, data_entropy, default_budgets, objective_settings
from testbed.fit.protocols import holdout as holdout_mod
from testbed.fit.protocols.allocation import optimal_allocation
from testbed.stats.curves import percentile

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


def compare_groups(law: Law, frame: pd.DataFrame, options, described: dict) -> Analysis:
    """One fit per value of --by and each variant's compute multiplier over the baseline;
    `described`: the summary fields of the points (analysis.described)."""
    if not law.has_compute_frontier:
        raise TestbedError(f"--by needs a law of N and D (chinchilla or kaplan); law {law.name!r} has no compute frontier.")
    values = sorted(frame[options.by].astype(str).unique())
    if len(values) < 2:
        raise TestbedError(f"--by {options.by} has a single value ({values}); compare a column with two or more variants.")
    baseline = options.baseline or values[0]
    if baseline not in values:
        raise TestbedError(f"--baseline {baseline!r} is not a value of {options.by}; use one of {', '.join(values)}.")
    budgets = options.budgets or default_budgets(frame)
    labels = frame[options.by].astype(str)
    results, per_group = {}, {}
    # Every group's E stays above the data's entropy, as in a single fit (guards.py).
    entropy, _ = data_entropy(frame, options.columns)
    floor = entropy if law.floor is not None else None
    bounds = guards.floor_bounds(law, options.bounds, floor)
    for value in values:
        part = frame[labels == value]
        train = part[~part["held_out"]]
        fixed = constraints_for(law, train, options.variant, options.fix, options.columns)
        problem = guards.fixed_floor_problem(law, fixed, bounds, floor)
        if problem:
            raise TestbedError(f"--variant {options.variant} ({options.by}={value}): {problem}.")
        result = fit(law, law_inputs(law, train), train["loss"].to_numpy(float), delta=options.delta,
                     variant=options.variant, fixed=fixed, bounds=bounds, **objective_settings(options, train))
        results[value] = (result, train)
        entry = {"params": result.params, "objective": result.objective, "converged": result.converged,
                 "n_points": result.n_points, "at_bound": result.at_bound}
        held = part[part["held_out"]]
        if len(held):
            entry.update(holdout_mod.evaluate(result.predict(law_inputs(law, held)), held))
        per_group[value] = entry
    base_result, base_train = results[baseline]
    c_low = float(frame["C"].min()) if "C" in frame else float((6 * frame["N"] * frame["D"]).min())
    comparisons = {}
    for value in values:
        if value == baseline:
            continue
        result, train = results[value]
        point = compute_multiplier(law, base_result.theta, result.theta, budgets)
        # Each arm's wild cluster bootstrap by run (fit.bootstrap), the two arms drawn independently:
        # their runs are different runs. A failed refit counts beyond either end of the interval.
        base_thetas = replicate_thetas(base_result, base_train, options.bootstrap, delta=options.delta,
                                       seed=options.seed)
        variant_thetas = replicate_thetas(result, train, options.bootstrap, delta=options.delta, seed=options.seed + 1)
        samples = [compute_multiplier(law, b, v, budgets) if np.all(np.isfinite(b)) and np.all(np.isfinite(v))
                   else np.full(len(budgets), np.nan) for b, v in zip(base_thetas, variant_thetas)]
        rows = []
        for i, c in enumerate(budgets):
            row = {"C": c, "multiplier": float(point[i])}
            if samples:
                row["low"], row["high"] = percentile(np.array([s[i] for s in samples]))
            rows.append(row)
        comparisons[value] = {
            "multiplier": rows,
            "crossings_C": crossings(law, base_result.theta, result.theta, c_low / 100, max(budgets) * 100),
        }
    # The multipliers are predictions at the budgets: name any far beyond the fitted compute.
    summary = FitSummary(**described, params=base_result.params, objective=base_result.objective,
                         variant=options.variant, by=options.by, baseline=baseline, groups=per_group,
                         comparisons=comparisons, budgets=budgets)
    summary.warnings += guards.extrapolation(frame[~frame["held_out"]], {"C": np.asarray(budgets, float)},
                                             "the budget", "give --budgets within the data")
    groups = {value: r for value, (r, _) in results.items()}
    return Analysis(law, options, frame, base_result, summary, groups)
