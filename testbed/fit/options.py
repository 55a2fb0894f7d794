"""What one fit is asked for (`FitOptions`), what it gives (`Analysis`), and the defaults both
the single fit (analysis.py) and the per-variant comparison (comparison.py) take."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from testbed.errors import TestbedError
from testbed.fit.estimate import FitResult
from testbed.fit.lawbase import Law


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
    where: str | list[str] | None = None  # row rules (testbed/fit/rules.py), combined with `and`
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


@dataclass
class Analysis:
    law: Law
    options: FitOptions
    frame: pd.DataFrame  # every clean point; `held_out` marks the validation rows
    result: FitResult
    summary: dict
    groups: dict = field(default_factory=dict)  # comparison: label value -> FitResult


ENTROPY_COLUMN = "data_entropy"  # the training data's entropy per token (nats), from `testbed fit collect`


def data_entropy(frame: pd.DataFrame, columns: str | None = None) -> tuple[float | None, str]:
    """(the data's entropy per token, where it comes from) or (None, why not). It is in the units
    of the table's own `loss` column (nats per token), so a loss mapped from another column
    (`--columns loss=bpb`) is not compared with it."""
    if ENTROPY_COLUMN not in frame.columns:
        return None, f"no {ENTROPY_COLUMN} column"
    from testbed.fit.table import parse_columns

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
