"""One fit from start to finish: load, select points, choose a variant, fit, validate, bootstrap.

Returns an `Analysis` holding plain JSON-ready `summary` (what fit.json stores) plus the frames
and fitted objects the plots need.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from testbed.errors import TestbedError
from testbed.fit import guards
from testbed.fit import holdout as holdout_mod
from testbed.fit import rules as rules_mod
from testbed.fit.datacon import clip_unique as clip_unique_tokens
from testbed.fit.estimate import FitResult, fit
from testbed.fit.laws import Law, get_law, law_inputs, needed_columns
from testbed.fit.options import (  # noqa: F401
    ENTROPY_COLUMN,
    Analysis,
    FitOptions,
    constraints_for,
    data_entropy,
    default_budgets,
    objective_settings,
)
from testbed.fit.table import Points, load_points, points_line

AXIS_WORDS = {"N": "the largest model sizes", "D": "the largest token counts", "C": "the largest compute",
              "late": "the latest checkpoints"}
PARSIMONY = 0.05  # a variant with fewer free parameters is kept when its error is within 5% of the best


def _fit_frame(law: Law, frame: pd.DataFrame, options: FitOptions, variant: str, fixed: dict, starts=None) -> FitResult:
    return fit(law, law_inputs(law, frame), frame["loss"].to_numpy(float), delta=options.delta,
               variant=variant, fixed=fixed, starts=starts, bounds=options.bounds,
               **objective_settings(options, frame))


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


def fitted_floor(law: Law, frame: pd.DataFrame, options: FitOptions) -> tuple[float | None, str]:
    """(E, how it was found) for `fixed_E` when neither --fix E nor the data's entropy gives it:
    the floor of a power law in compute, L = E + A / C^alpha, fitted to the points of `frame`.
    It is a separate, simpler fit than the law's own, so fixing E to it is a real constraint."""
    if law.name == "power" or not ({"C"} <= set(frame.columns) or {"N", "D"} <= set(frame.columns)):
        return None, "no compute column to fit a floor on"
    power = get_law("power")
    compute = frame["C"] if "C" in frame.columns else 6.0 * frame["N"] * frame["D"]
    compute = compute.to_numpy(float)
    if len(np.unique(compute)) < 4:
        return None, "fewer than four compute values to fit a floor on"
    try:
        floor = fit(power, {"X": compute, "logX": np.log(compute)}, frame["loss"].to_numpy(float),
                    delta=options.delta).params["E"]
    except TestbedError as err:
        return None, f"the floor fit failed ({err})"
    return float(floor), f"fitted floor: E of L = E + A / C^alpha on {len(frame)} points"


def variant_constraints(law: Law, frame: pd.DataFrame, variant: str, fix: dict,
                        options: FitOptions | None = None, floor: float | None = None,
                        bounds: dict | None = None) -> tuple[dict, str | None]:
    """(fixed values, why the variant cannot be tried or None). With `options` (--variant auto),
    an E that neither --fix nor the data's entropy gives is fitted as a floor (`fitted_floor`).
    `fixed["E_source"]` says where a fixed E came from. A fixed value below the law's bound for
    it (`bounds`: --bounds, else the law's), or an E below the data's entropy (`floor`), is a
    reason not to try the variant."""
    fixed = constraints_for(law, frame, variant, fix)
    if "E" in law.variant(variant).fixed:
        if "E" in fix:
            fixed["E_source"] = f"--fix E={fix['E']:g}"
        elif floor is not None:
            fixed["E"] = floor
            fixed["E_source"] = f"the data's entropy ({ENTROPY_COLUMN} column)"
        elif "E" in fixed:  # constraints_for found an entropy that `floor` was not given for
            fixed.pop("E")
    if options is not None and "E" in law.variant(variant).fixed and "E" not in fixed:
        floor_fit, how = fitted_floor(law, frame, options)
        if floor_fit is not None:
            fixed["E"] = floor_fit
            fixed["E_source"] = how
    missing = [name for name in law.variant(variant).fixed if name not in fixed]
    if missing:
        return fixed, (f"no value for {', '.join(missing)}: pass --fix {missing[0]}=VALUE or use runs that "
                       f"record data_entropy" + (" (a floor could not be fitted)" if options is not None else ""))
    values = {k: v for k, v in fixed.items() if k != "E_source"}
    problem = guards.fixed_floor_problem(law, values, bounds or {}, floor,
                                         fitted=str(fixed.get("E_source", "")).startswith("fitted floor"))
    if problem:
        return fixed, f"{problem} ({fixed.get('E_source', 'fixed')})"
    return fixed, None


def inner_split(train_all: pd.DataFrame, axis: str, options: FitOptions) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(rows to fit, rows to score, what was done) for --variant auto: the outer protocol again,
    inside the training runs. Along N, D or C the largest training runs are held out; the rest
    are fitted up to --train-until of each run, and the held-out ones scored past --score-after,
    as the outer fit and score are. So a target scored late in its run is chosen for on late
    points, not on the early points that were fitted. `train_all` is the training runs before
    --train-until cut them: the inner held-out runs' later checkpoints are scored, never fitted."""
    def upto(part: pd.DataFrame) -> pd.DataFrame:
        if options.train_until is None:
            return part
        return part[part["run_fraction"].to_numpy(float) <= options.train_until + 1e-9]

    notes = []
    if axis == "late":  # late checkpoints of the same runs: the latest of the fitted ones
        base = upto(train_all)
        inner = holdout_mod.inner_mask(base, "late")
        return base[~inner], base[inner], ""
    inner = holdout_mod.inner_mask(train_all, axis)
    fitted, scored = upto(train_all[~inner]), train_all[inner]
    if options.train_until is not None:
        notes.append(f"fitted up to {options.train_until:.0%} of each run")
    if options.score_after is not None:
        late = scored[scored["run_fraction"].to_numpy(float) >= options.score_after - 1e-9]
        if len(late):
            scored = late
            notes.append(f"scored past {options.score_after:.0%} of each run")
        else:
            scored = upto(scored)
            notes.append(f"scored on their checkpoints up to {options.train_until or 1:.0%}: none lies past "
                         f"--score-after {options.score_after:.0%}")
    return fitted, scored, ("; " + "; ".join(notes)) if notes else ""


def select_variant(law: Law, train_all: pd.DataFrame, options: FitOptions, axis: str = "C",
                   floor: float | None = None) -> tuple[str, dict]:
    """Fit every variant the data allow on the training runs less their extreme runs along
    `axis` (the axis of the outer holdout), with the outer --train-until and --score-after
    (`inner_split`), and keep the one that predicts those best; simpler variants win ties
    within PARSIMONY. Returns (variant, record for fit.json)."""
    try:
        train, valid, notes = inner_split(train_all, axis, options)
    except TestbedError as err:
        raise TestbedError(f"--variant auto cannot hold out {AXIS_WORDS[axis]} inside the training data ({err}); "
                           f"pass --variant free or tied.") from None
    errors: dict[str, dict] = {}
    for spec in law.variants:
        # A fitted floor comes from the inner training runs only, like every other parameter.
        fixed, why_not = variant_constraints(law, train, spec.name, options.fix, options, floor, options.bounds)
        if why_not:
            errors[spec.name] = {"skipped": why_not}
            continue
        source = fixed.pop("E_source", None)
        try:
            result = _fit_frame(law, train, options, spec.name, fixed)
        except TestbedError as err:
            errors[spec.name] = {"skipped": str(err)}
            continue
        predicted = result.predict(law_inputs(law, valid))
        rel = np.abs(predicted - valid["loss"].to_numpy()) / np.abs(valid["loss"].to_numpy())
        errors[spec.name] = {"mean_abs_rel_error": float(rel.mean()), "objective": result.objective,
                             "n_free": result.n_free, "fixed": result.fixed, "tied": result.tied}
        if source:
            errors[spec.name]["E_source"] = source
    scored = {k: v for k, v in errors.items() if "mean_abs_rel_error" in v}
    if not scored:
        reasons = "; ".join(f"{k}: {v['skipped']}" for k, v in errors.items())
        raise TestbedError(f"--variant auto could not fit any variant on the inner split ({reasons}); "
                           f"pass --variant free.")
    best = min(scored, key=lambda k: scored[k]["mean_abs_rel_error"])
    best_error = scored[best]["mean_abs_rel_error"]
    close = [k for k, v in scored.items() if v["mean_abs_rel_error"] <= best_error * (1 + PARSIMONY) + 1e-12]
    chosen = min(close, key=lambda k: (scored[k]["n_free"], scored[k]["mean_abs_rel_error"]))
    others = ", ".join(f"{k} {v['mean_abs_rel_error']:.3%}" for k, v in scored.items() if k != chosen)
    why = (f"lowest error on {AXIS_WORDS[axis]} held out inside the training data "
           f"({scored[chosen]['mean_abs_rel_error']:.3%}; {others or 'no other variant'})")
    if chosen != best:
        why = (f"fewest free parameters among the variants within {PARSIMONY:.0%} of the lowest error on "
               f"{AXIS_WORDS[axis]} held out inside the training data ({chosen} "
               f"{scored[chosen]['mean_abs_rel_error']:.3%}; {others})")
    inner: dict[str, float] = {"fitted_points": int(len(train)), "scored_points": int(len(valid))}
    if "run_fraction" in train_all.columns:
        inner["fitted_run_fraction_max"] = float(train["run_fraction"].max())
        inner["scored_run_fraction_min"] = float(valid["run_fraction"].min())
    record = {"chosen": chosen, "why": why, "validation": errors, "axis": axis,
              "rule": f"{AXIS_WORDS[axis]} of the training data held out "
                      f"({int(valid['run_id'].nunique())} of {int(train_all['run_id'].nunique())} runs, "
                      f"{len(valid)} points scored{notes})",
              "inner_held_out_runs": sorted(map(str, valid["run_id"].unique())), "inner": inner}
    return chosen, record


def isoflop_shaped(frame: pd.DataFrame) -> bool:
    """Three or more compute budgets, each with four or more points spread over model size."""
    if not {"N", "C"} <= set(frame.columns) or len(frame) < 12:
        return False
    from testbed.fit.approaches import isoflop_groups

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


def attach_schedules(points: Points, every: Points) -> Points:
    """Curve laws: each row carries its run's whole logged LR schedule (`schedule`: steps, lrs),
    taken before --skip-fraction, --where, --holdout or --train-until drop rows, so the LR areas
    still start at step 1."""
    schedules = {run: (part["step"].to_numpy(float), part["lr"].to_numpy(float))
                 for run, part in every.frame.sort_values("step").groupby("run_id", sort=False)}
    frame = points.frame.copy()
    frame["schedule"] = [schedules.get(run) for run in frame["run_id"]]
    return Points(frame, points.dropped, points.warnings, points.run_column, points.rows)


def analyse(source, options: FitOptions) -> Analysis:
    law = get_law(options.law)
    needed, positive = needed_columns(law)
    extra = (options.by,) if options.by else ()
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
    for column in extra:
        if column not in frame.columns:
            raise TestbedError(f"--by {column!r} is not a column of the table; use one of {', '.join(map(str, frame.columns))}.")
    if frame.empty:
        raise TestbedError(f"no point is left to fit after dropping rows ({points.dropped}); check --columns and filters.")

    warnings = list(points.warnings)
    dropped = dict(points.dropped)
    frame = clip_unique(law, frame.copy(), warnings)
    frame["held_out"] = holdout_mod.holdout_mask(frame, options.holdout) if options.holdout else False
    before_fractions = frame
    frame = apply_fractions(frame, options, dropped)
    train = frame[~frame["held_out"]]
    check_identifiable(law, train)

    summary: dict = {"law": law.name, "formula": law.formula, "n_points": int(len(frame)),
                     "n_runs": int(frame["run_id"].nunique()), "dropped": dropped,
                     "run_column": points.run_column, "warnings": warnings}
    if points.rows:
        summary["rows"] = dict(points.rows)
    if options.by:
        from testbed.fit.comparison import compare_groups

        return compare_groups(law, frame, options, summary)

    # The data's entropy: where the law has an irreducible loss, its lower bound in every fit.
    entropy, entropy_source = data_entropy(frame, options.columns)
    floor = entropy if law.floor is not None else None
    fit_options = replace(options, bounds=guards.floor_bounds(law, options.bounds, floor))
    if floor is not None:
        summary["entropy"] = {"value": floor, "source": entropy_source, "bounds": law.floor}
    variant = options.variant
    if variant == "auto":
        axis = holdout_mod.rule_axis(frame, options.holdout)
        variant, record = select_variant(law, before_fractions[~before_fractions["held_out"]], fit_options,
                                         axis, entropy)
        summary["variant_selection"] = record
    # auto: a fixed_E chosen with a fitted floor refits that floor on all the training points.
    fixed, why_not = variant_constraints(law, train, variant, options.fix,
                                         fit_options if options.variant == "auto" else None, entropy,
                                         fit_options.bounds)
    if why_not:
        raise TestbedError(f"--variant {variant}: {why_not}.")
    if "E_source" in fixed:
        summary["E_source"] = fixed.pop("E_source")
    began = time.perf_counter()
    result = _fit_frame(law, train, fit_options, variant, fixed)
    summary.update({
        "variant": variant, "fixed": result.fixed, "tied": result.tied, "params": result.params,
        "objective": result.objective, "converged": result.converged, "message": result.message,
        "at_bound": result.at_bound, "flat": result.flat, "n_fit_points": result.n_points,
        "n_starts": result.n_starts, "fit_seconds": round(time.perf_counter() - began, 3),
        "huber_delta": options.delta, "objective_kind": options.objective, "weight": options.weight,
    })
    if points.rows:
        held_rows = int(frame["held_out"].sum())
        summary["rows"]["line"] = points_line(points.rows, result.n_points, held_rows, points.run_column,
                                              "point_kind" in frame.columns)
    if options.bounds:
        summary["bounds"] = {k: list(v) for k, v in options.bounds.items()}
    at_floor = floor is not None and law.floor in result.at_bound and fit_options.bounds[law.floor][0] == floor and (
        result.params[law.floor] <= floor * (1 + 1e-2))
    other_bounds = [name for name in result.at_bound if not (at_floor and name == law.floor)]
    if at_floor:
        summary["warnings"].append(
            f"{law.floor} ended at the data's entropy ({floor:.4g}), its lower bound: the points do not bend "
            f"towards a floor above it; fit --variant fixed_E (E = the entropy) or add larger runs.")
    if other_bounds:
        summary["warnings"].append(f"parameters ended at a bound: {', '.join(other_bounds)}; widen the bounds "
                                   f"(--bounds NAME=LOW:HIGH) or fix them (--fix).")
    if result.flat:
        summary["warnings"].append(f"the objective is flat in {', '.join(result.flat)}: the data do not determine "
                                   f"them; fix them (--fix NAME=VALUE) or add points that vary them.")
    if not result.converged:
        summary["warnings"].append(f"the optimiser did not report convergence ({result.message}).")

    if options.holdout:
        held = frame[frame["held_out"]]
        summary.update(holdout_mod.evaluate(result.predict(law_inputs(law, held)), held))
        summary["holdout_rule"] = options.holdout
        summary["warnings"] += guards.extrapolation(
            train, {axis: held[axis].to_numpy(float) for axis in guards.AXES if axis in held.columns},
            "held-out", "add runs in between to check the law there")

    derived = None
    allocation = law.has_compute_frontier and (
        options.allocation == "yes" or (options.allocation == "auto" and isoflop_shaped(train)))
    if law.has_compute_frontier and not allocation and options.allocation == "auto":
        summary["allocation_skipped"] = ("the data are not IsoFLOP-shaped (three or more compute budgets with "
                                         "four or more model sizes each); pass --allocation yes to report it anyway")
    outside: dict[float, str] = {}
    if allocation:
        from testbed.fit.allocation import derived_quantities, optimal_allocation

        budgets = options.budgets or default_budgets(frame)
        summary["budgets"] = budgets

        def derived(theta, law=law, budgets=budgets):
            return derived_quantities(law, theta, budgets)

        summary["derived"] = derived(result.theta)
        summary["warnings"] += guards.extrapolation(
            train, {"C": np.asarray(budgets, float)}, "the budget",
            "give --budgets within the data, or read the allocation there as a guess")
        outside = guards.allocation_outside(train, optimal_allocation(law, result.theta, budgets), entropy,
                                            entropy_source)
        for budget, why in outside.items():
            summary["warnings"].append(f"the compute-optimal allocation at C={budget:.3g} is {why}: not reported; "
                                       f"add runs that bracket it, or give --budgets where the runs do.")
        if {"N", "C"} <= set(frame.columns):
            from testbed.fit.approaches import approach1, approach2

            summary["warnings"] += guards.bracket_warnings(train)
            for name, fn in (("approach1", approach1), ("approach2", approach2)):
                found = fn(train)
                if found is not None:
                    summary[name] = {k: v for k, v in found.items() if k != "minima"} | {
                        "minima": [{k: v for k, v in m.items() if k != "curve"} for m in found["minima"]]}
    summary["allocation"] = bool(allocation)
    samples = None
    if options.bootstrap:
        from testbed.fit.bootstrap import bootstrap

        intervals, samples = bootstrap(result, train, options.bootstrap, delta=options.delta,
                                       seed=options.seed, derived=derived,
                                       point_weights=objective_settings(options, train)["point_weights"])
        summary["intervals"] = {k: v.as_dict() for k, v in intervals.items()}
        summary["bootstrap"] = {"resamples": options.bootstrap, "failed": samples.attrs.get("failed", 0),
                                "unit": "run_id", "level": 0.95}
    set_aside(summary, outside)
    if options.holdout:
        from testbed.fit.bootstrap import PI_RESAMPLES, prediction_intervals, replicate_thetas

        level = 0.95
        held = frame[frame["held_out"]]
        thetas = samples.attrs["thetas"] if samples is not None else replicate_thetas(
            result, train, PI_RESAMPLES, delta=options.delta, seed=options.seed,
            point_weights=objective_settings(options, train)["point_weights"])
        low, high = prediction_intervals(result, train, held, thetas, level=level, seed=options.seed)
        for row, lo, hi in zip(summary["holdout"], low, high):
            row["pi_low"], row["pi_high"] = float(lo), float(hi)
            row["inside"] = bool(lo <= row["loss"] <= hi)
        checked, calibration_warnings = guards.calibration(summary["holdout"], held, level)
        summary["prediction_interval"] = {
            "level": level, "resamples": int(len(thetas)),
            "method": "refits on wild bootstrap replicates by run, plus a training run's offset "
                      "from the law (inflated for the parameters fitted) and a residual within a run, "
                      "both drawn at random (fit space); percentile interval",
            **checked,
        }
        summary["warnings"] += calibration_warnings
    return Analysis(law, options, frame, result, summary)


ALLOCATION_KEYS = ("N_opt", "D_opt", "tokens_per_param", "loss")


def set_aside(summary: dict, outside: dict[float, str]) -> None:
    """Move the allocation at each budget in `outside` (budget -> why) out of `derived` (and its
    intervals) into `derived_outside`, so it is kept for inspection but not read as a result."""
    if not outside:
        return
    aside = {}
    for budget, why in outside.items():
        tag = f"{budget:.2g}"
        for key in ALLOCATION_KEYS:
            name = f"{key}@C={tag}"
            if name in summary.get("derived", {}):
                entry = {"value": summary["derived"].pop(name), "why": why}
                if name in summary.get("intervals", {}):
                    entry["interval"] = summary["intervals"].pop(name)
                aside[name] = entry
    summary["derived_outside"] = aside
