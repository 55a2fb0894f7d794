"""Seed intervals: what the variation between seeds says about a mean or a gap.

A study has few seeds per cell (two on a CPU), too few for a bootstrap: resampling two values
gives three possible means, and a percentile interval of them is about [min, max], which covers
far less than 95%. Seed noise is a property of the training recipe, not of one cell, so the
seed-to-seed variance is pooled over every cell of a study that has replicates, and each interval
is a t interval with the pooled degrees of freedom. Losses are compared on the log scale, where
the noise is about proportional to the loss and a gap reads as a ratio.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as sps

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A value with its interval and the name of the method that gave it. `caveat` names a
    condition under which no verdict may rest on it (an optimum at a grid edge or outside the
    sampled range); `low`/`high` are None where no interval can be had, and may be infinite."""

    value: float | None
    low: float | None = None
    high: float | None = None
    method: str = ""
    caveat: str = ""

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None


@dataclass(frozen=True)
class SeedNoise:
    """Seed-to-seed variance of one run's value, pooled over cells, with its degrees of freedom."""

    variance: float
    df: int
    cells: int
    log: bool = True  # on the log scale (losses) or the raw one (errors)

    def describe(self) -> str:
        sd = math.sqrt(self.variance)
        scale = f"{sd:.2%} of the loss" if self.log else f"{sd:.3g}"
        return f"seed SD {scale}, pooled over {self.cells} cells ({self.df} df)"


def _scale(values: ArrayLike, log: bool) -> np.ndarray:
    array = np.asarray(values, float)
    return np.log(array) if log else array


def seed_noise(groups: Iterable[ArrayLike], log: bool = True) -> SeedNoise | None:
    """Pooled within-group variance of the values (each group: the seeds of one cell at one
    setting); None when no group has two values."""
    total, df, cells = 0.0, 0, 0
    for group in groups:
        x = _scale(group, log)
        if len(x) < 2:
            continue
        total += float(np.sum((x - x.mean()) ** 2))
        df += len(x) - 1
        cells += 1
    return SeedNoise(total / df, df, cells, log) if df else None


def paired_noise(pairs: Iterable[tuple[ArrayLike, ArrayLike]]) -> SeedNoise | None:
    """The pooled variance of per-pair log ratios log(a / b), one (a, b) per cell: the noise a
    paired `relative_gap` needs."""
    return seed_noise([_scale(a, True) - _scale(b, True) for a, b in pairs], log=False)


def t_bounds(center: float, se: float, df: float, level: float = LEVEL) -> tuple[float, float]:
    half = float(sps.t.ppf(0.5 + level / 2, df)) * se
    return center - half, center + half


def relative_gap(a: ArrayLike, b: ArrayLike, noise: SeedNoise | None = None,
                 paired: bool = False, level: float = LEVEL) -> Estimate:
    """(a / b) − 1 as the ratio of geometric means of two arms' losses, with a t interval.

    paired: a[i] and b[i] share seed i (its initialisation and data order), so the gap is the
    mean of the per-seed log ratios and seed noise common to both arms cancels; `noise` is then
    the pooled variance of those log ratios. Unpaired: `noise` is one run's pooled variance.
    Without `noise` the cell's own replicates give the variance (when it has any)."""
    x, y = _scale(a, True), _scale(b, True)
    if paired:
        if len(x) != len(y):
            raise ValueError(f"a paired gap needs one b per a (got {len(x)} and {len(y)})")
        d = x - y
        center = float(d.mean())
        if noise is None and len(d) > 1:
            noise = SeedNoise(float(d.var(ddof=1)), len(d) - 1, 1)
        se = math.sqrt(noise.variance / len(d)) if noise else None
        method = "paired by seed, t interval"
    else:
        center = float(x.mean() - y.mean())
        if noise is None:
            noise = seed_noise([x, y], log=False)
        se = math.sqrt(noise.variance * (1 / len(x) + 1 / len(y))) if noise else None
        method = "t interval"
    if se is None or noise is None:
        return Estimate(math.expm1(center), method="one seed per arm and no pooled seed noise: no interval")
    low, high = t_bounds(center, se, noise.df, level)
    return Estimate(math.expm1(center), math.expm1(low), math.expm1(high),
                    f"{method} ({noise.describe() if noise.cells > 1 else f'{noise.df} df from this cell'})")


def mean_interval(values: ArrayLike, noise: SeedNoise | None = None, level: float = LEVEL) -> Estimate:
    """The mean of one cell's seeds with a t interval from the pooled (raw-scale) seed noise,
    or from the cell's own spread without it."""
    x = np.asarray(values, float)
    if noise is None and len(x) > 1:
        noise = SeedNoise(float(x.var(ddof=1)), len(x) - 1, 1, log=False)
    if noise is None:
        return Estimate(float(x.mean()), method="one seed and no pooled seed noise: no interval")
    low, high = t_bounds(float(x.mean()), math.sqrt(noise.variance / len(x)), noise.df, level)
    return Estimate(float(x.mean()), low, high, f"t interval ({noise.describe()})")


def spread(groups: Sequence[ArrayLike], noise: SeedNoise | None = None, draws: int = 4000,
           seed: int = 0, level: float = LEVEL) -> Estimate:
    """(max − min) / min of the groups' geometric-mean losses, with a parametric bootstrap: each
    group's mean drawn around its estimate with the pooled seed variance, itself drawn from its
    chi-square (so few degrees of freedom widen the interval as a t interval would)."""
    means = np.array([_scale(g, True).mean() for g in groups])
    sizes = np.array([np.size(g) for g in groups], dtype=np.float64)
    value = math.expm1(float(means.max() - means.min()))
    if noise is None:
        noise = seed_noise(groups)
    if noise is None:
        return Estimate(value, method="one seed per group and no pooled seed noise: no interval")
    rng = np.random.default_rng(seed)
    variance = noise.variance * noise.df / rng.chisquare(noise.df, size=draws)
    drawn = means[None, :] + rng.standard_normal((draws, len(means))) * np.sqrt(variance[:, None] / sizes[None, :])
    values = np.expm1(drawn.max(axis=1) - drawn.min(axis=1))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return Estimate(value, float(low), float(high),
                    f"parametric bootstrap of the group means ({noise.describe()})")
