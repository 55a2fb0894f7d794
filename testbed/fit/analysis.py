"""One fit from start to finish: load, select points, choose a variant, fit, validate, bootstrap.

Returns an `Analysis` holding plain JSON-ready `summary` (what fit.json stores) plus the frames
and fitted objects the plots need.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from testbed.errors import TestbedError
from testbed.fit import holdout as holdout_mod
from testbed.fit.estimate import FitResult, fit
from testbed.fit.laws import Law, get_law, law_inputs, needed_columns
from testbed.fit.options import Analysis, FitOptions, constraints_for, default_budgets  # noqa: F401
from testbed.fit.table import Points, load_points


def _fit_frame(law: Law, frame: pd.DataFrame, options: FitOptions, variant: str, fixed: dict, starts=None) -> FitResult:
    return fit(law, law_inputs(law, frame), frame["loss"].to_numpy(float), delta=options.delta,
               variant=variant, fixed=fixed, starts=starts)


def apply_where(points: Points, rule: str | None) -> Points:
    """Keep rows matching a column rule such as `C>=2.18e17`; the rest are counted as dropped."""
    if not rule:
        return points
    held = holdout_mod.rule_mask(points.frame, rule, option="--where")
    dropped = dict(points.dropped)
    if (~held).any():
        dropped[f"not matching --where {rule}"] = int((~held).sum())
    return Points(points.frame[held].reset_index(drop=True), dropped, points.warnings)


def select_variant(law: Law, frame: pd.DataFrame, options: FitOptions) -> tuple[str, dict]:
    """Pick the variant with the lowest error on the largest runs held out inside `frame`."""
    inner = holdout_mod.holdout_mask(frame, "largest")
    train, valid = frame[~inner], frame[inner]
    errors = {}
    for spec in law.variants:
        try:
            fixed = constraints_for(law, frame, spec.name, options.fix)
            result = _fit_frame(law, train, options, spec.name, fixed)
        except TestbedError as err:
            errors[spec.name] = {"skipped": str(err)}
            continue
        predicted = result.predict(law_inputs(law, valid))
        rel = np.abs(predicted - valid["loss"].to_numpy()) / np.abs(valid["loss"].to_numpy())
        errors[spec.name] = {"mean_abs_rel_error": float(rel.mean()), "objective": result.objective}
    scored = {k: v["mean_abs_rel_error"] for k, v in errors.items() if "mean_abs_rel_error" in v}
    if not scored:
        raise TestbedError("--variant auto could not fit any variant on the inner split; pass --variant free.")
    return min(scored, key=scored.get), errors


def curves_table(sweep_dir) -> pd.DataFrame:
    """Loss curves for the annealing law: validation points where a run has them, else train."""
    from testbed.fit.collect import collect_curves

    curves = collect_curves(sweep_dir)
    parts = []
    for _, run in curves.groupby("run_id", sort=False):
        run = run.sort_values("step")
        known = run["lr"].notna()
        if known.sum() >= 2:  # evaluation lines may lack lr: interpolate it from the train lines
            run = run.assign(lr=np.interp(run["step"], run.loc[known, "step"], run.loc[known, "lr"].astype(float)))
        val = run[run["loss_kind"] == "val"]
        parts.append(val if len(val) >= 5 else run[run["loss_kind"] == "train"])
    return pd.concat(parts, ignore_index=True)


def analyse(source, options: FitOptions) -> Analysis:
    law = get_law(options.law)
    needed, positive = needed_columns(law)
    extra = (options.by,) if options.by else ()
    if law.name == "annealing" and not isinstance(source, pd.DataFrame) and Path(source).is_dir():
        source = curves_table(source)  # whole loss curves from metrics.jsonl, not checkpoints
    points = load_points(source, needed, positive, options.columns, options.points, options.skip_fraction)
    points = apply_where(points, options.where)
    frame = points.frame
    for column in extra:
        if column not in frame.columns:
            raise TestbedError(f"--by {column!r} is not a column of the table; use one of {', '.join(map(str, frame.columns))}.")
    if frame.empty:
        raise TestbedError(f"no point is left to fit after dropping rows ({points.dropped}); check --columns and filters.")

    frame = frame.copy()
    frame["held_out"] = holdout_mod.holdout_mask(frame, options.holdout) if options.holdout else False
    train = frame[~frame["held_out"]]

    summary: dict = {"law": law.name, "formula": law.formula, "n_points": int(len(frame)),
                     "n_runs": int(frame["run_id"].nunique()), "dropped": points.dropped,
                     "warnings": list(points.warnings)}
    if options.by:
        from testbed.fit.comparison import compare_groups

        return compare_groups(law, frame, options, summary)

    variant = options.variant
    if variant == "auto":
        variant, errors = select_variant(law, train, options)
        summary["variant_selection"] = {"chosen": variant, "validation": errors,
                                        "rule": "largest 10% of training runs held out inside the fit"}
    fixed = constraints_for(law, train, variant, options.fix)
    began = time.perf_counter()
    result = _fit_frame(law, train, options, variant, fixed)
    summary.update({
        "variant": variant, "fixed": result.fixed, "tied": result.tied, "params": result.params,
        "objective": result.objective, "converged": result.converged, "message": result.message,
        "at_bound": result.at_bound, "n_fit_points": result.n_points, "n_starts": result.n_starts,
        "fit_seconds": round(time.perf_counter() - began, 3), "huber_delta": options.delta,
    })
    if result.at_bound:
        summary["warnings"].append(f"parameters ended at a bound: {', '.join(result.at_bound)}; widen the bounds or fix them.")
    if not result.converged:
        summary["warnings"].append(f"the optimiser did not report convergence ({result.message}).")

    if options.holdout:
        held = frame[frame["held_out"]]
        summary.update(holdout_mod.evaluate(result.predict(law_inputs(law, held)), held))
        summary["holdout_rule"] = options.holdout

    derived = None
    if law.has_compute_frontier:
        from testbed.fit.allocation import derived_quantities

        budgets = options.budgets or default_budgets(frame)
        summary["budgets"] = budgets

        def derived(theta, law=law, budgets=budgets):
            return derived_quantities(law, theta, budgets)

        summary["derived"] = derived(result.theta)
        if {"N", "C"} <= set(frame.columns):
            from testbed.fit.approaches import approach1, approach2

            for name, fn in (("approach1", approach1), ("approach2", approach2)):
                found = fn(train)
                if found is not None:
                    summary[name] = {k: v for k, v in found.items() if k != "minima"} | {
                        "minima": [{k: v for k, v in m.items() if k != "curve"} for m in found["minima"]]}
    if options.bootstrap:
        from testbed.fit.bootstrap import bootstrap

        intervals, samples = bootstrap(result, train, options.bootstrap, delta=options.delta,
                                       seed=options.seed, derived=derived)
        summary["intervals"] = {k: v.as_dict() for k, v in intervals.items()}
        summary["bootstrap"] = {"resamples": options.bootstrap, "failed": samples.attrs.get("failed", 0),
                                "unit": "run_id", "level": 0.95}
    return Analysis(law, options, frame, result, summary)
