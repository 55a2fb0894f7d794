"""What one fit is asked for (`FitOptions`), what it gives (`Analysis`), and the defaults both
the single fit (analysis.py) and the per-variant comparison (protocols/variants.py) take."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd

from testbed.errors import TestbedError
from testbed.fit.estimation.estimate import FitResult
from testbed.fit.laws.base import Law


@dataclass
class FitOptions:
    law: str = "chinchilla"
    columns: str | None = None
    holdout: str | None = None
    bootstrap: int = 0
    variant: str = "free"  # a law variant, or "auto" to choose by nested extrapolation error
    fix: dict[str, float] = field(default_factory=dict)
    delta: float = 1e-3
    points: str = "final"
    skip_fraction: float = 0.1
    where: str | list[str] | None = None  # row rules (testbed/fit/points/rules.py), combined with `and`
    train_until: float | None = None  # fit only training checkpoints up to this fraction of their run
    score_after: float | None = None  # score only held-out checkpoints past this fraction of their run
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)  # public name -> (low, high)
    allocation: str = "auto"  # compute-optimal allocation and IsoFLOP analyses: auto, yes or no
    objective: str = "huber"  # "huber", or "asymmetric[:w]": over-predictions count w times (a lower envelope)
    weight: str = "none"  # point weights: "none", or "compute" (each point in proportion to its C = 6ND)
    budgets: list[float] | None = None
    by: str | None = None
    baseline: str | None = None
    seed: int = 0


@dataclass(kw_only=True)
class FitSummary:
    """What a fit found, as report.md, the plots and fit.json read it. A field left None is not
    written (`to_dict`: fit.json's keys are these names, in this order). Nested records (intervals,
    holdout rows, variant selection...) are plain JSON-ready dictionaries."""

    law: str
    formula: str
    n_points: int  # clean points, held-out ones included
    n_runs: int
    dropped: dict[str, int]  # why rows were dropped -> how many
    run_column: str | None  # the column that named the runs (written even when None)
    warnings: list[str]
    rows: dict | None = None  # the table's points by kind, and `line` describing them
    # --by COLUMN: one fit per variant of an ablation (protocols/variants.py)
    by: str | None = None
    baseline: str | None = None
    groups: dict[str, dict] | None = None  # variant -> its fit
    comparisons: dict[str, dict] | None = None  # variant -> compute multipliers and crossings
    # the single fit
    entropy: dict | None = None  # the data's entropy bounding the law's floor: value, source, bounds
    variant_selection: dict | None = None  # --variant auto: the inner validation record
    E_source: str | None = None  # where a fixed E came from
    variant: str
    fixed: dict[str, float] | None = None
    tied: dict[str, str] | None = None
    params: dict[str, float]  # the fitted law's public parameters (the baseline's with --by)
    objective: float
    converged: bool | None = None
    message: str | None = None
    at_bound: list[str] | None = None
    flat: list[str] | None = None
    n_fit_points: int | None = None
    n_starts: int | None = None
    fit_seconds: float | None = None
    huber_delta: float | None = None
    objective_kind: str | None = None
    weight: str | None = None
    bounds: dict[str, list[float]] | None = None  # --bounds as given
    # --holdout: held-out rows (prediction intervals added to each), their mean error, the rule
    holdout: list[dict] | None = None
    mean_abs_rel_error: float | None = None
    holdout_rule: str | None = None
    # compute-optimal allocation
    allocation_skipped: str | None = None
    budgets: list[float] | None = None
    derived: dict[str, float] | None = None  # "N_opt@C=1e+20", "a", ... -> value
    approach1: dict | None = None
    approach2: dict | None = None
    allocation: bool | None = None
    # --bootstrap
    intervals: dict[str, dict] | None = None  # name -> estimate, low, high, se
    bootstrap: dict | None = None
    derived_outside: dict[str, dict] | None = None  # allocations set aside: value, why, interval
    prediction_interval: dict | None = None
    plots: list[str] | None = None  # the plot files written beside fit.json

    def to_dict(self) -> dict:
        """fit.json's dictionary: every field that is set, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None or f.name == "run_column"}


@dataclass
class Analysis:
    law: Law
    options: FitOptions
    frame: pd.DataFrame  # every clean point; `held_out` marks the validation rows
    result: FitResult
    summary: FitSummary
    groups: dict = field(default_factory=dict)  # comparison: label value -> FitResult


ENTROPY_COLUMN = "data_entropy"  # the training data's entropy per token (nats), from `testbed fit collect`


def data_entropy(frame: pd.DataFrame, columns: str | None = None) -> tuple[float | None, str]:
    """(the data's entropy per token, where it comes from) or (None, why not). It is in the units
    of the table's own `loss` column (nats per token), so a loss mapped from another column
    (`--columns loss=bpb`) is not compared with it."""
    if ENTROPY_COLUMN not in frame.columns:
        return None, f"no {ENTROPY_COLUMN} column"
    from testbed.fit.points.table import parse_columns

    mapped = parse_columns(columns).get("loss", "loss") if isinstance(columns, (str, type(None))) else "loss"
    if mapped != "loss":
        return None, f"the loss is mapped from {mapped!r}, whose units the {ENTROPY_COLUMN} column may not share"
    entropy = pd.to_numeric(frame[ENTROPY_COLUMN], errors="coerce").dropna().unique()
    if len(entropy) != 1:
        return None, (f"the {ENTROPY_COLUMN} column holds {len(entropy)} values" if len(entropy) else
                      f"the {ENTROPY_COLUMN} column is empty")
    return float(entropy[0]), f"the data's entropy ({ENTROPY_COLUMN} column)"


def constraints_for(law: Law, frame: pd.DataFrame, variant: str, fix: dict, columns: str | None = None) -> dict:
    """Fixed values for a variant: the user's, else E from the data's known entropy."""
    fixed = dict(fix)
    if "E" in law.variant(variant).fixed and "E" not in fixed:
        entropy, _ = data_entropy(frame, columns)
        if entropy is not None:
            fixed["E"] = entropy
    return fixed


def default_budgets(frame: pd.DataFrame) -> list[float]:
    top = float(frame["C"].max()) if "C" in frame else float((6 * frame["N"] * frame["D"]).max())
    return [top, 10 * top, 100 * top]


ASYMMETRY_DEFAULT = 10.0  # `--objective asymmetric`: an over-prediction counts ten times an under-prediction


def asymmetry(objective: str) -> float:
    """The weight of over-predictions for `--objective huber | asymmetric | asymmetric:W`."""
    name, sep, value = objective.partition(":")
    if name == "huber" and not sep:
        return 1.0
    if name == "asymmetric":
        try:
            w = float(value) if sep else ASYMMETRY_DEFAULT
        except ValueError:
            w = float("nan")
        if w >= 1.0:
            return w
    raise TestbedError(f"--objective {objective!r} is unknown; use huber, asymmetric (over-predictions count "
                       f"{ASYMMETRY_DEFAULT:g}x) or asymmetric:W with W >= 1, e.g. asymmetric:5.")


def point_weights(frame: pd.DataFrame, weight: str) -> np.ndarray | None:
    """Per-point weights for `--weight`: None, or each point's compute (C, else 6·N·D, else X)
    over the mean, so the total weight stays the number of points."""
    if weight == "none":
        return None
    if weight != "compute":
        raise TestbedError(f"--weight {weight!r} is unknown; use none or compute (points weighted by C = 6ND).")
    if "C" in frame.columns:
        compute = pd.to_numeric(frame["C"], errors="coerce").to_numpy(float)
    elif {"N", "D"} <= set(frame.columns):
        compute = 6.0 * frame["N"].to_numpy(float) * frame["D"].to_numpy(float)
    elif "X" in frame.columns:
        compute = frame["X"].to_numpy(float)
    else:
        raise TestbedError("--weight compute needs a compute column C (or N and D, or X); map one with --columns C=COLUMN.")
    if not np.all(np.isfinite(compute) & (compute > 0)):
        raise TestbedError("--weight compute: some points have no positive compute; check the C (or N, D) column.")
    return compute / compute.mean()


def objective_settings(options: FitOptions, frame: pd.DataFrame) -> dict:
    """The estimator's keyword arguments for the options' objective, on the points of `frame`."""
    return {"point_weights": point_weights(frame, options.weight), "asymmetry": asymmetry(options.objective)}
