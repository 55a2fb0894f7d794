"""Variant selection for `--variant auto`: the outer holdout protocol repeated inside the training
runs, each variant the data allow fitted there and scored on the inner held-out points; and the
fixed values (E from --fix, the data's entropy or a fitted floor) a variant needs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from testbed.errors import TestbedError
from testbed.fit.estimation import guards
from testbed.fit.estimation.estimate import FitResult, fit
from testbed.fit.laws import Law, get_law, law_inputs
from testbed.fit.options import ENTROPY_COLUMN, FitOptions, constraints_for, objective_settings
from testbed.fit.protocols import holdout as holdout_mod

AXIS_WORDS = {"N": "the largest model sizes", "D": "the largest token counts", "C": "the largest compute",
              "late": "the latest checkpoints"}
PARSIMONY = 0.05  # a variant with fewer free parameters is kept when its error is within 5% of the best


def fit_frame(law: Law, frame: pd.DataFrame, options: FitOptions, variant: str, fixed: dict, starts=None) -> FitResult:
    return fit(law, law_inputs(law, frame), frame["loss"].to_numpy(float), delta=options.delta,
               variant=variant, fixed=fixed, starts=starts, bounds=options.bounds,
               **objective_settings(options, frame))



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
            result = fit_frame(law, train, options, spec.name, fixed)
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
