"""Bootstrap intervals that resample whole runs.

Checkpoints of one run share its noise and are not independent, so the resampling unit is the
run id: each replicate draws runs with replacement and keeps all their rows. Each replicate is
refitted from the full-data optima (no grid), which is what makes hundreds of refits cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from testbed.fit.estimate import FitResult, fit_replicates
from testbed.fit.laws import law_inputs


@dataclass
class Interval:
    estimate: float
    low: float
    high: float
    se: float

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "se": self.se}


def resample_runs(frame: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    groups = frame.groupby("run_id", sort=False).indices
    runs = list(groups)
    drawn = rng.integers(0, len(runs), size=len(runs))
    rows = np.concatenate([groups[runs[i]] for i in drawn])
    # Each drawn copy becomes its own run, so laws that integrate along a run (the annealing
    # law) never merge two copies into one curve.
    copy_ids = np.concatenate([[f"{runs[i]}#{k}"] * len(groups[runs[i]]) for k, i in enumerate(drawn)])
    sample = frame.iloc[rows].copy()
    sample["run_id"] = copy_ids
    return sample


def bootstrap(
    result: FitResult,
    frame: pd.DataFrame,
    n_resamples: int,
    *,
    delta: float = 1e-3,
    seed: int = 0,
    level: float = 0.95,
    derived: Callable[[np.ndarray], dict[str, float]] | None = None,
) -> tuple[dict[str, Interval], pd.DataFrame]:
    """Percentile intervals for every parameter (and derived quantity) of `result`."""
    law = result.law
    rng = np.random.default_rng(seed)
    run_index = pd.factorize(frame["run_id"])[0]
    n_runs = run_index.max() + 1
    # Drawing runs with replacement = weighting each run by how often it was drawn.
    counts = rng.multinomial(n_runs, np.full(n_runs, 1.0 / n_runs), size=n_resamples)
    weights = counts[:, run_index].astype(float)
    thetas = fit_replicates(result, law_inputs(law, frame), frame["loss"].to_numpy(float), weights, delta=delta)
    samples = []
    for theta in thetas:
        if not np.all(np.isfinite(theta)):
            continue  # a degenerate replicate is skipped, and counted below
        row = law.public(theta)
        if derived is not None:
            row.update(derived(theta))
        samples.append(row)
    table = pd.DataFrame(samples)
    point = dict(result.params)
    if derived is not None:
        point.update(derived(result.theta))
    tail = 100 * (1 - level) / 2
    intervals = {}
    for name, estimate in point.items():
        values = table[name].to_numpy(float) if name in table else np.array([])
        values = values[np.isfinite(values)]
        if len(values) < 2:
            intervals[name] = Interval(estimate, float("nan"), float("nan"), float("nan"))
            continue
        low, high = np.percentile(values, [tail, 100 - tail])
        intervals[name] = Interval(float(estimate), float(low), float(high), float(values.std(ddof=1)))
    table.attrs["failed"] = n_resamples - len(samples)
    return intervals, table
