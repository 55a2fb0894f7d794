"""One fit from start to finish: load, select points, choose a variant, fit, validate, bootstrap.

Returns an `Analysis` holding its typed `summary` (a `FitSummary`: what report.md, the plots and,
through `to_dict`, fit.json read) plus the frames and fitted objects the plots need.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from testbed.errors import TestbedError
from testbed.fit.estimation import guards
from testbed.fit.estimation.estimate import FitResult
from testbed.fit.laws import Law, get_law, law_inputs, needed_columns
from testbed.fit.laws.datacon import clip_unique as clip_unique_tokens
from testbed.fit.options import (  # noqa: F401
    ENTROPY_COLUMN,
    Analysis,
    FitOptions,
    FitSummary,
    constraints_for,
    data_entropy,
    default_budgets,
    objective_settings,
)
from testbed.fit.points import rules as rules_mod
from testbed.fit.points.table import Points, load_points, points_line
from testbed.fit.protocols import holdout as holdout_mod
from testbed.fit.protocols.selection import fit_frame, select_variant, variant_constraints


def apply_where(points: Points, rules: str | list[str] | None) -> Points:
    """Keep rows matching every rule (rules combine with `and`); the rest are counted as dropped."""
    rules = [rules] if isinstance(rules, str) else list(rules or [])
    if not rules:
        return points
    held = np.ones(len(points.frame), dtype=bool)
    for rule in rules:
        held &= rules_mod.rule_mask(points.frame, rule, option="--where")
    dropped = dict(points.dropped)
    if (~held).any():
        dropped[f"not matching --where {' and '.join(rules)}"] = int((~held).sum())
    return Points(points.frame[held].reset_index(drop=True), dropped, points.warnings, points.run_column, points.rows)


def apply_fractions(frame: pd.DataFrame, options: FitOptions, dropped: dict) -> pd.DataFrame:
    """--train-until: fit only training checkpoints up to that fraction of their run;
    --score-after: score only held-out checkpoints past that fraction of their run."""
    for flag, value in (("--train-until", options.train_until), ("--score-after", options.score_after)):
        if value is None:
            continue
        if not 0.0 < value <= 1.0:
            raise TestbedError(f"{flag} {value} is outside (0, 1]; give a fraction of each run, e.g. {flag} 0.7.")
        if "run_fraction" not in frame.columns:
            raise TestbedError(f"{flag} needs each point's position in its run: a token (D), step or X column; "
                               f"map one with --columns D=COLUMN.")
    keep = np.ones(len(frame), dtype=bool)
    held = frame["held_out"].to_numpy(bool)
    if options.train_until is not None:
        late = ~held & (frame["run_fraction"].to_numpy(float) > options.train_until + 1e-9)
        if late.any():
            dropped[f"training checkpoints past {options.train_until:.0%} of their run (--train-until)"] = int(late.sum())
        keep &= ~late
    if options.score_after is not None:
        if not held.any():
            raise TestbedError("--score-after selects held-out checkpoints; give --holdout too (e.g. --holdout largest-N).")
        early = held & (frame["run_fraction"].to_numpy(float) < options.score_after - 1e-9)
        if early.all() or not (held & ~early).any():
            raise TestbedError(f"--score-after {options.score_after} leaves no held-out checkpoint; give a smaller fraction.")
        if early.any():
            dropped[f"held-out checkpoints before {options.score_after:.0%} of their run (--score-after)"] = int(early.sum())
        keep &= ~early
    return frame[keep].reset_index(drop=True)


def check_identifiable(law: Law, frame: pd.DataFrame) -> None:
    """A term of the law needs two or more distinct values of its input among the fitted points."""
    for name, term in law.terms.items():
        if name not in frame.columns:
            continue
        values = pd.to_numeric(frame[name], errors="coerce").dropna().unique()
        if len(values) < 2:
            shown = f" ({values[0]:.4g})" if len(values) else ""
            others = [c for c in ("N", "D", "C") if c != name and c in frame.columns]
            alt = f"--law power --columns X={others[0]}" if others else "a law without it"
            raise TestbedError(
                f"the fitted points hold a single {name}{shown}, so the term {term} of --law {law.name} cannot be "
                f"identified; add runs with other {name} values, or fit {alt}.")


def clip_unique(law: Law, frame: pd.DataFrame, warnings: list[str]) -> pd.DataFrame:
    """data_constrained: fewer tokens seen than unique tokens (D < U) means U cannot all have been
    seen; U is clipped to D for those rows, with a warning."""
    if "U" not in law.inputs or not {"U", "D"} <= set(frame.columns):
        return frame
    unique, clipped = clip_unique_tokens(frame["D"].to_numpy(float), frame["U"].to_numpy(float))
    if clipped:
        frame = frame.copy()
        frame["U"] = unique
        warnings.append(f"{clipped} rows have D < U (fewer tokens seen than unique tokens); U was clipped "
                        f"to D for them. Check the U column (--columns U=COLUMN).")
    return frame


def isoflop_shaped(frame: pd.DataFrame) -> bool:
    """Three or more compute budgets, each with four or more points spread over model size."""
    if not {"N", "C"} <= set(frame.columns) or len(frame) < 12:
        return False
    from testbed.fit.protocols.approaches import isoflop_groups

    compute = frame["C"].to_numpy(float)
    labels = isoflop_groups(compute)
    good = 0
    for label in np.unique(labels):
        group = frame[labels == label]
        log_c = np.log10(group["C"].to_numpy(float))
        if len(group) >= 4 and np.ptp(np.log(group["N"].to_numpy(float))) >= 0.1 and np.ptp(log_c) <= 0.3:
            good += 1
    return good >= 3


def curves_table(sweep_dir) -> pd.DataFrame:
    """Loss curves for the curve laws (annealing, multipower): validation points where a run has
    them, else train."""
    from testbed.fit.points.collect import collect_curves

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


def attach_schedules(points: Points, every: Points) -> Points:
    """Curve laws: each row carries its run's whole logged LR schedule (`schedule`: steps, lrs),
    taken before --skip-fraction, --where, --holdout or --train-until drop rows, so the LR areas
    still start at step 1."""
    schedules = {run: (part["step"].to_numpy(float), part["lr"].to_numpy(float))
                 for run, part in every.frame.sort_values("step").groupby("run_id", sort=False)}
    frame = points.frame.copy()
    frame["schedule"] = [schedules.get(run) for run in frame["run_id"]]
    return Points(frame, points.dropped, points.warnings, points.run_column, points.rows)


@dataclass
class Prepared:
    """The points one fit works on, after loading and every row selection."""

    law: Law
    points: Points  # as loaded (its rows, run column and table warnings)
    frame: pd.DataFrame  # every clean point; `held_out` marks the validation rows
    before_fractions: pd.DataFrame  # the same before --train-until and --score-after cut it
    warnings: list[str]
    dropped: dict[str, int]

    @property
    def train(self) -> pd.DataFrame:
        return self.frame[~self.frame["held_out"]]


def prepare(source, options: FitOptions) -> Prepared:
    """Load the points the law needs, apply --where, --holdout and the run fractions, and check
    the law can be identified on the training points."""
    law = get_law(options.law)
    needed, positive = needed_columns(law)
    if options.allocation not in ("auto", "yes", "no"):
        raise TestbedError(f"--allocation {options.allocation!r} is unknown; use auto, yes or no.")
    if law.curves and not isinstance(source, pd.DataFrame) and Path(source).is_dir():
        source = curves_table(source)  # whole loss curves from metrics.jsonl, not checkpoints
    points = load_points(source, needed, positive, options.columns, options.points, options.skip_fraction)
    every = points
    if law.curves:
        every = load_points(source, needed, positive, options.columns, "all", 0.0)
        points = attach_schedules(points, every)
    points = apply_where(points, options.where)
    frame = points.frame
    guards.refuse_nonpositive(law, every.frame, frame)
    if options.by and options.by not in frame.columns:
        raise TestbedError(f"--by {options.by!r} is not a column of the table; use one of {', '.join(map(str, frame.columns))}.")
    if frame.empty:
        raise TestbedError(f"no point is left to fit after dropping rows ({points.dropped}); check --columns and filters.")
    warnings = list(points.warnings)
    dropped = dict(points.dropped)
    frame = clip_unique(law, frame.copy(), warnings)
    frame["held_out"] = holdout_mod.holdout_mask(frame, options.holdout) if options.holdout else False
    before_fractions = frame
    frame = apply_fractions(frame, options, dropped)
    prepared = Prepared(law, points, frame, before_fractions, warnings, dropped)
    check_identifiable(law, prepared.train)
    return prepared


def described(prep: Prepared) -> dict:
    """The summary fields every fit has, single or per variant: the law and the points."""
    frame = prep.frame
    return {"law": prep.law.name, "formula": prep.law.formula, "n_points": int(len(frame)),
            "n_runs": int(frame["run_id"].nunique()), "dropped": prep.dropped,
            "run_column": prep.points.run_column, "warnings": prep.warnings,
            "rows": dict(prep.points.rows) if prep.points.rows else None}


def analyse(source, options: FitOptions) -> Analysis:
    prep = prepare(source, options)
    law, frame, train = prep.law, prep.frame, prep.train
    if options.by:
        from testbed.fit.protocols.variants import compare_groups

        return compare_groups(law, frame, options, described(prep))

    # The data's entropy: where the law has an irreducible loss, its lower bound in every fit.
    entropy, entropy_source = data_entropy(frame, options.columns)
    floor = entropy if law.floor is not None else None
    fit_options = replace(options, bounds=guards.floor_bounds(law, options.bounds, floor))
    variant, selection = options.variant, None
    if variant == "auto":
        axis = holdout_mod.rule_axis(frame, options.holdout)
        variant, selection = select_variant(law, prep.before_fractions[~prep.before_fractions["held_out"]],
                                            fit_options, axis, entropy)
    # auto: a fixed_E chosen with a fitted floor refits that floor on all the training points.
    fixed, why_not = variant_constraints(law, train, variant, options.fix,
                                         fit_options if options.variant == "auto" else None, entropy,
                                         fit_options.bounds)
    if why_not:
        raise TestbedError(f"--variant {variant}: {why_not}.")
    e_source = fixed.pop("E_source", None)
    began = time.perf_counter()
    result = fit_frame(law, train, fit_options, variant, fixed)
    summary = FitSummary(
        **described(prep), params=result.params, objective=result.objective, variant=variant,
        entropy={"value": floor, "source": entropy_source, "bounds": law.floor} if floor is not None else None,
        variant_selection=selection, E_source=e_source, fixed=result.fixed, tied=result.tied,
        converged=result.converged, message=result.message, at_bound=result.at_bound, flat=result.flat,
        n_fit_points=result.n_points, n_starts=result.n_starts, fit_seconds=round(time.perf_counter() - began, 3),
        huber_delta=options.delta, objective_kind=options.objective, weight=options.weight,
        bounds={k: list(v) for k, v in options.bounds.items()} or None)
    if summary.rows is not None:
        summary.rows["line"] = points_line(prep.points.rows, result.n_points, int(frame["held_out"].sum()),
                                           prep.points.run_column, "point_kind" in frame.columns)
    summary.warnings += fit_warnings(law, result, floor, fit_options)
    if options.holdout:
        score_holdout(summary, law, result, frame, train, options.holdout)
    derived, outside = allocate(summary, law, result, frame, train, options, entropy, entropy_source)
    samples = None
    if options.bootstrap:
        samples = run_bootstrap(summary, result, train, options, derived)
    set_aside(summary, outside)
    if options.holdout:
        add_prediction_intervals(summary, result, frame, train, options, samples)
    return Analysis(law, options, frame, result, summary)


def fit_warnings(law: Law, result: FitResult, floor: float | None, fit_options: FitOptions) -> list[str]:
    """What the fit itself says about its numbers: a floor at the data's entropy, parameters at a
    bound, an objective flat in some parameters, no convergence."""
    warnings = []
    at_floor = floor is not None and law.floor in result.at_bound and fit_options.bounds[law.floor][0] == floor and (
        result.params[law.floor] <= floor * (1 + 1e-2))
    other_bounds = [name for name in result.at_bound if not (at_floor and name == law.floor)]
    if at_floor:
        warnings.append(
            f"{law.floor} ended at the data's entropy ({floor:.4g}), its lower bound: the points do not bend "
            f"towards a floor above it; fit --variant fixed_E (E = the entropy) or add larger runs.")
    if other_bounds:
        warnings.append(f"parameters ended at a bound: {', '.join(other_bounds)}; widen the bounds "
                        f"(--bounds NAME=LOW:HIGH) or fix them (--fix).")
    if result.flat:
        warnings.append(f"the objective is flat in {', '.join(result.flat)}: the data do not determine "
                        f"them; fix them (--fix NAME=VALUE) or add points that vary them.")
    if not result.converged:
        warnings.append(f"the optimiser did not report convergence ({result.message}).")
    return warnings


def score_holdout(summary: FitSummary, law: Law, result: FitResult, frame: pd.DataFrame, train: pd.DataFrame,
                  rule: str) -> None:
    """--holdout: the law's prediction of each held-out point and the mean relative error."""
    held = frame[frame["held_out"]]
    scored = holdout_mod.evaluate(result.predict(law_inputs(law, held)), held)
    summary.holdout, summary.mean_abs_rel_error = scored["holdout"], scored["mean_abs_rel_error"]
    summary.holdout_rule = rule
    summary.warnings += guards.extrapolation(
        train, {axis: held[axis].to_numpy(float) for axis in guards.AXES if axis in held.columns},
        "held-out", "add runs in between to check the law there")


def allocate(summary: FitSummary, law: Law, result: FitResult, frame: pd.DataFrame, train: pd.DataFrame,
             options: FitOptions, entropy: float | None, entropy_source: str):
    """The compute-optimal allocation at the budgets and Approaches 1 and 2, where the law has a
    compute frontier and the data are IsoFLOP-shaped (or --allocation yes). Returns (the derived
    quantities as a function of theta for the bootstrap, or None; budget -> why its allocation is
    not reported)."""
    allocation = law.has_compute_frontier and (
        options.allocation == "yes" or (options.allocation == "auto" and isoflop_shaped(train)))
    summary.allocation = bool(allocation)
    if law.has_compute_frontier and not allocation and options.allocation == "auto":
        summary.allocation_skipped = ("the data are not IsoFLOP-shaped (three or more compute budgets with "
                                      "four or more model sizes each); pass --allocation yes to report it anyway")
    if not allocation:
        return None, {}
    from testbed.fit.protocols.allocation import derived_quantities, optimal_allocation

    budgets = options.budgets or default_budgets(frame)
    summary.budgets = budgets

    def derived(theta, law=law, budgets=budgets):
        return derived_quantities(law, theta, budgets)

    summary.derived = derived(result.theta)
    summary.warnings += guards.extrapolation(
        train, {"C": np.asarray(budgets, float)}, "the budget",
        "give --budgets within the data, or read the allocation there as a guess")
    outside = guards.allocation_outside(train, optimal_allocation(law, result.theta, budgets), entropy,
                                        entropy_source)
    for budget, why in outside.items():
        summary.warnings.append(f"the compute-optimal allocation at C={budget:.3g} is {why}: not reported; "
                                f"add runs that bracket it, or give --budgets where the runs do.")
    if {"N", "C"} <= set(frame.columns):
        from testbed.fit.protocols.approaches import approach1, approach2

        summary.warnings += guards.bracket_warnings(train)
        for name, fn in (("approach1", approach1), ("approach2", approach2)):
            found = fn(train)
            if found is not None:
                setattr(summary, name, {k: v for k, v in found.items() if k != "minima"} | {
                    "minima": [{k: v for k, v in m.items() if k != "curve"} for m in found["minima"]]})
    return derived, outside


def run_bootstrap(summary: FitSummary, result: FitResult, train: pd.DataFrame, options: FitOptions, derived):
    """--bootstrap: percentile intervals of the parameters (and derived quantities) over wild
    cluster bootstrap replicates by run. Returns the replicates."""
    from testbed.fit.estimation.bootstrap import bootstrap

    intervals, samples = bootstrap(result, train, options.bootstrap, delta=options.delta,
                                   seed=options.seed, derived=derived,
                                   point_weights=objective_settings(options, train)["point_weights"])
    summary.intervals = {k: v.as_dict() for k, v in intervals.items()}
    summary.bootstrap = {"resamples": options.bootstrap, "failed": samples.attrs.get("failed", 0),
                         "unit": "run_id", "level": 0.95}
    return samples


def add_prediction_intervals(summary: FitSummary, result: FitResult, frame: pd.DataFrame, train: pd.DataFrame,
                             options: FitOptions, samples, level: float = 0.95) -> None:
    """A prediction interval for each held-out point (the bootstrap's refits, else fresh ones),
    and whether the intervals cover as often as they claim."""
    from testbed.fit.estimation.bootstrap import PI_RESAMPLES, prediction_intervals, replicate_thetas

    assert summary.holdout is not None
    held = frame[frame["held_out"]]
    thetas = samples.attrs["thetas"] if samples is not None else replicate_thetas(
        result, train, PI_RESAMPLES, delta=options.delta, seed=options.seed,
        point_weights=objective_settings(options, train)["point_weights"])
    low, high = prediction_intervals(result, train, held, thetas, level=level, seed=options.seed)
    for row, lo, hi in zip(summary.holdout, low, high):
        row["pi_low"], row["pi_high"] = float(lo), float(hi)
        row["inside"] = bool(lo <= row["loss"] <= hi)
    checked, calibration_warnings = guards.calibration(summary.holdout, held, level)
    summary.prediction_interval = {
        "level": level, "resamples": int(len(thetas)),
        "method": "refits on wild bootstrap replicates by run, plus a training run's offset "
                  "from the law (inflated for the parameters fitted) and a residual within a run, "
                  "both drawn at random (fit space); percentile interval",
        **checked,
    }
    summary.warnings += calibration_warnings


ALLOCATION_KEYS = ("N_opt", "D_opt", "tokens_per_param", "loss")


def set_aside(summary: FitSummary, outside: dict[float, str]) -> None:
    """Move the allocation at each budget in `outside` (budget -> why) out of `derived` (and its
    intervals) into `derived_outside`, so it is kept for inspection but not read as a result."""
    if not outside:
        return
    derived, intervals = summary.derived or {}, summary.intervals or {}
    aside = {}
    for budget, why in outside.items():
        tag = f"{budget:.2g}"
        for key in ALLOCATION_KEYS:
            name = f"{key}@C={tag}"
            if name in derived:
                entry = {"value": derived.pop(name), "why": why}
                if name in intervals:
                    entry["interval"] = intervals.pop(name)
                aside[name] = entry
    summary.derived_outside = aside
