"""What one fit is asked for (`FitOptions`), what it gives (`Analysis`), and the defaults both
the single fit (analysis.py) and the per-variant comparison (comparison.py) take."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

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


def constraints_for(law: Law, frame: pd.DataFrame, variant: str, fix: dict) -> dict:
    """Fixed values for a variant: the user's, else E from the data's known entropy."""
    fixed = dict(fix)
    if "E" in law.variant(variant).fixed and "E" not in fixed and "data_entropy" in frame:
        entropy = pd.to_numeric(frame["data_entropy"], errors="coerce").dropna().unique()
        if len(entropy) == 1:
            fixed["E"] = float(entropy[0])
    return fixed


def default_budgets(frame: pd.DataFrame) -> list[float]:
    top = float(frame["C"].max()) if "C" in frame else float((6 * frame["N"] * frame["D"]).max())
    return [top, 10 * top, 100 * top]
