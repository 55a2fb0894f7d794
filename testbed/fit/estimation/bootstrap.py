"""Bootstrap intervals for a fitted law: a wild cluster bootstrap by run.

Checkpoints of one run share its noise and are not independent, so the unit is the run: each
replicate keeps every run and every point (the design as it was run) and flips the sign of each
run's residuals at random (testbed.stats.curves.wild_cluster_targets). Resampling the runs
themselves would refit on duplicated design points and leave some replicates without a size.
Each replicate is refitted from the full-data optimum (no grid), which makes hundreds of refits
cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from testbed.fit.estimation.estimate import FitResult, fit_replicates, one_blas_thread
from testbed.fit.laws import law_inputs
from testbed.progress import Progress
from testbed.stats.curves import percentile, wild_cluster_targets

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


def fit_space_residuals(result: FitResult, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(fitted values, observed − fitted) at the fit, in the law's fit space (log-loss or loss)."""
    law = result.law
    with np.errstate(over="ignore", invalid="ignore"):
        fitted = law.predict(result.theta[None, :], law_inputs(law, frame))[0]
    observed = frame["loss"].to_numpy(float)
    return fitted, (np.log(observed) if law.space == "log" else observed) - fitted


def replicate_targets(result: FitResult, frame: pd.DataFrame, n_resamples: int, seed: int = 0) -> np.ndarray:
    """(K, n) responses in the law's fit space for a wild cluster bootstrap by run
    (testbed.stats.curves.wild_cluster_targets): the fitted law plus each run's residuals with one
    random sign per run. The design stays as it was run: no run is duplicated or dropped, which a
    resample of a dozen runs (a dozen design points) would do."""
    fitted, residuals = fit_space_residuals(result, frame)
    residuals = np.where(np.isfinite(residuals), residuals, 0.0)
    return wild_cluster_targets(fitted, residuals, frame["run_id"].to_numpy(), n_resamples, result.n_free, seed)


def replicate_thetas(result: FitResult, frame: pd.DataFrame, n_resamples: int, *, delta: float = 1e-3,
                     seed: int = 0, point_weights: np.ndarray | None = None) -> np.ndarray:
    """Refits on `n_resamples` wild cluster bootstrap replicates: (K, P), failed replicates nan.
    `point_weights`: the original fit's per-point weights (`--weight`), kept in every replicate."""
    weights = np.ones((n_resamples, len(frame))) * (1.0 if point_weights is None else point_weights[None, :])
    law = result.law
    return fit_replicates(result, law_inputs(law, frame), frame["loss"].to_numpy(float), weights, delta=delta,
                          targets=replicate_targets(result, frame, n_resamples, seed))


def scatter(result: FitResult, train: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(run offsets, within-run residuals) of the training fit, in the law's fit space.

    A new run lands off the law by its own offset (seed, data order: the between-run scatter)
    plus the noise of its checkpoints around it. Each training run's offset is its mean residual;
    the fit pulled the law towards those runs, so the offsets are widened by sqrt(R / (R - p))
    for R runs and p free parameters (where R > p). With one point per run the within-run
    residuals are all zero and the offsets are the residuals."""
    residuals = pd.Series(fit_space_residuals(result, train)[1])
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
    """Percentile intervals for every parameter (and derived quantity) of `result`, from a wild
    cluster bootstrap by run (`replicate_thetas`). A failed replicate is counted beyond either
    end of each interval (testbed.stats.curves.percentile), never dropped."""
    law = result.law
    thetas = replicate_thetas(result, frame, n_resamples, delta=delta, seed=seed, point_weights=point_weights)
    point = dict(result.params)
    if derived is not None:
        point.update(derived(result.theta))
    samples = []
    # The derived quantities (allocations at each budget) are solved replicate by replicate.
    with Progress("bootstrap: parameters and derived quantities", total=len(thetas), unit="replicate") as progress:
        for theta in thetas:
            progress.update()
            if not np.all(np.isfinite(theta)):
                samples.append({name: np.nan for name in point})  # a degenerate replicate, counted
                continue
            row = law.public(theta)
            if derived is not None:
                row.update(derived(theta))
            samples.append(row)
    table = pd.DataFrame(samples)
    intervals = {}
    for name, estimate in point.items():
        values = table[name].to_numpy(float) if name in table else np.full(len(table), np.nan)
        finite = values[np.isfinite(values)]
        if len(finite) < 2:
            intervals[name] = Interval(estimate, float("nan"), float("nan"), float("nan"))
            continue
        low, high = percentile(values, level)
        p16, p84 = np.percentile(finite, [15.865, 84.135])
        intervals[name] = Interval(float(estimate), low, high, float((p84 - p16) / 2), float(finite.std(ddof=1)))
    ok = np.all(np.isfinite(thetas), axis=1)
    table = table[ok].reset_index(drop=True)
    table.attrs["failed"] = int((~ok).sum())
    table.attrs["thetas"] = thetas[ok]
    return intervals, table
