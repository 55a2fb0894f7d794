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

from testbed.fit.estimate import FitResult, fit_replicates, one_blas_thread
from testbed.fit.laws import law_inputs

PI_RESAMPLES = 100  # replicates for held-out prediction intervals when --bootstrap is not given


@dataclass
class Interval:
    estimate: float
    low: float
    high: float
    se: float  # robust spread: half the central 68% range of the replicates (= SD if normal)
    sd: float = float("nan")  # raw standard deviation of the replicates (wild ones dominate it)

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "se": self.se, "sd": self.sd}


def run_weights(frame: pd.DataFrame, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(K, n) point weights: each run weighted by how often a resample of the runs drew it."""
    run_index = pd.factorize(frame["run_id"])[0]
    n_runs = run_index.max() + 1
    counts = rng.multinomial(n_runs, np.full(n_runs, 1.0 / n_runs), size=n_resamples)
    return counts[:, run_index].astype(float)


def replicate_thetas(result: FitResult, frame: pd.DataFrame, n_resamples: int, *, delta: float = 1e-3,
                     seed: int = 0, point_weights: np.ndarray | None = None) -> np.ndarray:
    """Refits on `n_resamples` resamples of whole runs: (K, P), failed replicates dropped.
    `point_weights`: the original fit's per-point weights (`--weight`), kept in every replicate."""
    weights = run_weights(frame, n_resamples, np.random.default_rng(seed))
    if point_weights is not None:
        weights = weights * point_weights[None, :]
    law = result.law
    thetas = fit_replicates(result, law_inputs(law, frame), frame["loss"].to_numpy(float), weights, delta=delta)
    return thetas[np.all(np.isfinite(thetas), axis=1)]


def scatter(result: FitResult, train: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(run offsets, within-run residuals) of the training fit, in the law's fit space.

    A new run lands off the law by its own offset (seed, data order: the between-run scatter)
    plus the noise of its checkpoints around it. Each training run's offset is its mean residual;
    the fit pulled the law towards those runs, so the offsets are widened by sqrt(R / (R - p))
    for R runs and p free parameters (where R > p). With one point per run the within-run
    residuals are all zero and the offsets are the residuals."""
    law = result.law
    with np.errstate(over="ignore", invalid="ignore"):
        fitted = law.predict(result.theta[None, :], law_inputs(law, train))[0]
    observed = train["loss"].to_numpy(float)
    residuals = pd.Series((np.log(observed) if law.space == "log" else observed) - fitted)
    ok = np.isfinite(residuals.to_numpy())
    residuals, runs = residuals[ok], train["run_id"].to_numpy()[ok]
    if not len(residuals):
        return np.zeros(1), np.zeros(1)
    run_mean = residuals.groupby(runs).transform("mean").to_numpy()
    offsets = residuals.groupby(runs).mean().to_numpy()
    n_runs, n_free = len(offsets), result.n_free
    if n_runs > n_free:
        offsets = offsets * np.sqrt(n_runs / (n_runs - n_free))
    return offsets, residuals.to_numpy() - run_mean


def prediction_intervals(result: FitResult, train: pd.DataFrame, held: pd.DataFrame, thetas: np.ndarray, *,
                         level: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile prediction intervals for the held-out rows: each replicate's prediction plus a
    training run's offset and a within-run residual drawn at random (`scatter`; all in the
    law's fit space: log-loss or loss)."""
    law = result.law
    if len(held) == 0:
        return np.array([]), np.array([])
    rng = np.random.default_rng(seed + 1)
    x_held = law_inputs(law, held)
    thetas = np.vstack([result.theta[None, :], thetas])
    with np.errstate(over="ignore", invalid="ignore"):
        predicted = law.predict(thetas, x_held)
    offsets, within = scatter(result, train)
    draws = predicted + rng.choice(offsets, size=predicted.shape) + rng.choice(within, size=predicted.shape)
    if law.space == "log":
        draws = np.exp(draws)
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(draws, [tail, 100 - tail], axis=0)
    return low, high


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


@one_blas_thread
def bootstrap(
    result: FitResult,
    frame: pd.DataFrame,
    n_resamples: int,
    *,
    delta: float = 1e-3,
    seed: int = 0,
    level: float = 0.95,
    derived: Callable[[np.ndarray], dict[str, float]] | None = None,
    point_weights: np.ndarray | None = None,
) -> tuple[dict[str, Interval], pd.DataFrame]:
    """Percentile intervals for every parameter (and derived quantity) of `result`."""
    law = result.law
    # Drawing runs with replacement = weighting each run by how often it was drawn.
    weights = run_weights(frame, n_resamples, np.random.default_rng(seed))
    if point_weights is not None:
        weights = weights * point_weights[None, :]
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
        low, high, p16, p84 = np.percentile(values, [tail, 100 - tail, 15.865, 84.135])
        intervals[name] = Interval(float(estimate), float(low), float(high), float((p84 - p16) / 2),
                                   float(values.std(ddof=1)))
    table.attrs["failed"] = n_resamples - len(samples)
    table.attrs["thetas"] = thetas[np.all(np.isfinite(thetas), axis=1)]
    return intervals, table
