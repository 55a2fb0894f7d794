"""Intervals for fitted curves, the joint IsoFLOP fit and the paired compute multiplier.

Curves are fitted to a few design points (sizes, budgets, vocabularies). Resampling those points
with replacement refits curves on duplicates, leaves some replicates with too few distinct points
and drops others: its intervals have no known coverage. Here the design stays fixed and the noise
is resampled instead: a parametric bootstrap draws new responses around the fitted curve with the
residual variance (itself drawn from its chi-square, so few degrees of freedom widen the interval
as a t interval would), and refits. Every replicate counts: one whose optimum leaves the sampled
range is kept and the fraction of such replicates is reported; when it could move an end of the
interval, the estimate carries a caveat and no verdict rests on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import least_squares

from testbed.stats.intervals import LEVEL, Estimate, t_bounds


def percentile(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval over every replicate: a failed one (nan) is placed beyond the end being
    computed (−inf for the lower end, +inf for the upper), so failures widen the interval, up to
    infinity, instead of vanishing from it."""
    values = np.asarray(values, float)
    failed = ~np.isfinite(values)
    tail = 100 * (1 - level) / 2
    low = np.percentile(np.where(failed, -np.inf, values), tail, method="lower")
    high = np.percentile(np.where(failed, np.inf, values), 100 - tail, method="higher")
    return float(low), float(high)


def parametric_bootstrap(fit: Callable[[np.ndarray], np.ndarray | None], fitted: np.ndarray, residual_sd: float,
                         df: int, draws: int = 400, seed: int = 0) -> list[np.ndarray | None]:
    """Refits of `fit` on `fitted` + normal noise of a residual SD drawn from its chi-square with
    `df` degrees of freedom; a failed refit is None (kept: callers count it)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        sd = residual_sd * math.sqrt(df / rng.chisquare(df))
        out.append(fit(fitted + sd * rng.standard_normal(len(fitted))))
    return out


def wild_cluster_targets(fitted: np.ndarray, residuals: np.ndarray, clusters: np.ndarray, draws: int,
                         n_params: int, seed: int = 0) -> np.ndarray:
    """(draws, n) responses for a wild cluster bootstrap: the fit plus each cluster's residuals
    with one random sign per cluster (Rademacher). A cluster is a run: its checkpoints share its
    noise, so they keep their residuals together; the design (each run's N, D, steps) stays as it
    was run, and no run is duplicated or dropped. The residuals are widened by sqrt(G / (G − p))
    for G clusters and p parameters, since the fit leans towards the points it was fitted on."""
    index = np.unique(np.asarray(clusters), return_inverse=True)[1]
    groups = int(index.max()) + 1 if len(index) else 0
    widen = math.sqrt(groups / (groups - n_params)) if groups > n_params else 1.0
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(draws, groups))
    return fitted[None, :] + signs[:, index] * (widen * residuals)[None, :]


# --------------------------------------------------------------------------------- IsoFLOP


@dataclass
class IsoflopFit:
    """L = h_j + k_j (log N − v0 − a (log C_j − mean log C))² over budgets j: a parabola in log N
    per budget whose vertex is linear in log C, so one slope a comes from all points at once."""

    a: float
    v0: float
    heights: np.ndarray
    curvatures: np.ndarray
    log_budgets: np.ndarray
    residual_sd: float
    df: int
    vertices: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.vertices = self.v0 + self.a * (self.log_budgets - self.log_budgets.mean())

    def predict(self, log_n: np.ndarray, budget: np.ndarray) -> np.ndarray:
        """The fitted loss at log N on budget index `budget` (into `log_budgets`)."""
        budget = np.asarray(budget, int)
        return self.heights[budget] + self.curvatures[budget] * (np.asarray(log_n, float) - self.vertices[budget]) ** 2


def _isoflop_model(theta: np.ndarray, log_n: np.ndarray, budget: np.ndarray, centred_c: np.ndarray) -> np.ndarray:
    b = len(centred_c)
    h, k, v0, a = theta[:b], theta[b:2 * b], theta[2 * b], theta[2 * b + 1]
    return h[budget] + k[budget] * (log_n - v0 - a * centred_c[budget]) ** 2


def isoflop_fit(log_n: np.ndarray, loss: np.ndarray, budget: np.ndarray, log_budgets: np.ndarray,
                start: np.ndarray | None = None) -> tuple[IsoflopFit, np.ndarray] | None:
    """Least-squares joint fit; `budget` indexes `log_budgets`. None when it cannot be fitted
    (fewer than three sizes per budget, two budgets, or a parabola opening downward)."""
    log_n, loss, budget = np.asarray(log_n, float), np.asarray(loss, float), np.asarray(budget, int)
    centred = log_budgets - log_budgets.mean()
    n_budgets = len(log_budgets)
    if n_budgets < 2 or any(len(np.unique(log_n[budget == j])) < 3 for j in range(n_budgets)):
        return None
    if start is None:
        heights, curvatures, vertices = [], [], []
        for j in range(n_budgets):
            c2, c1, c0 = np.polyfit(log_n[budget == j], loss[budget == j], 2)
            c2 = max(c2, 1e-3)
            vertex = float(np.clip(-c1 / (2 * c2), log_n[budget == j].min() - 1, log_n[budget == j].max() + 1))
            heights.append(c0 - c1**2 / (4 * c2) if c2 > 1e-3 else loss[budget == j].min())
            curvatures.append(c2)
            vertices.append(vertex)
        slope, v0 = np.polyfit(centred, vertices, 1)
        start = np.concatenate([heights, curvatures, [v0, slope]])
    low = np.concatenate([np.full(n_budgets, -np.inf), np.zeros(n_budgets), [-np.inf, -np.inf]])
    result = least_squares(lambda t: _isoflop_model(t, log_n, budget, centred) - loss,
                           np.maximum(start, low + 1e-9), bounds=(low, np.inf), method="trf")
    theta = result.x
    if not result.success or np.any(theta[n_budgets:2 * n_budgets] <= 1e-12):
        return None
    df = len(loss) - len(theta)
    residuals = loss - _isoflop_model(theta, log_n, budget, centred)
    sd = math.sqrt(float(residuals @ residuals) / df) if df > 0 else float("nan")
    fit = IsoflopFit(float(theta[-1]), float(theta[-2]), theta[:n_budgets], theta[n_budgets:2 * n_budgets],
                     np.asarray(log_budgets, float), sd, df)
    return fit, theta


def isoflop_slope(n: ArrayLike, loss: ArrayLike, budgets: ArrayLike, draws: int = 4000,
                  seed: int = 0, level: float = LEVEL) -> tuple[Estimate, IsoflopFit | None, dict]:
    """a in N_opt ∝ C^a from one joint fit over every budget's points, with a t interval from the
    fit's covariance s²(JᵀJ)⁻¹ (a is a parameter of the model, so nothing is derived from it).
    Every budget's vertex must lie inside that budget's sampled sizes, in the fit and in all but a
    tail's share of `draws` from the parameters' t distribution, or the estimate carries a caveat."""
    log_n, losses = np.log(np.asarray(n, float)), np.asarray(loss, float)
    keys, budget = np.unique(np.asarray(budgets, float), return_inverse=True)
    log_budgets = np.log(keys)
    found = isoflop_fit(log_n, losses, budget, log_budgets)
    method = "joint IsoFLOP fit (a parabola in log N per budget, vertex linear in log C)"
    if found is None:
        return Estimate(None, method=f"{method}: not fitted (too few sizes per budget or a parabola opening "
                                     "downward)"), None, {}
    fit, theta = found
    span_low = np.array([log_n[budget == j].min() for j in range(len(keys))])
    span_high = np.array([log_n[budget == j].max() for j in range(len(keys))])
    info = {"vertices_N": np.exp(fit.vertices).tolist(), "budgets": keys.tolist(),
            "inside": bool(np.all((fit.vertices >= span_low) & (fit.vertices <= span_high))),
            "residual_sd": fit.residual_sd, "df": fit.df}
    if fit.df < 1:
        return Estimate(fit.a, method=f"{method}: no residual degrees of freedom, no interval"), fit, info
    centred = log_budgets - log_budgets.mean()
    jac = _numeric_jacobian(lambda t: _isoflop_model(t, log_n, budget, centred), theta)
    cov = fit.residual_sd**2 * np.linalg.pinv(jac.T @ jac)
    low, high = t_bounds(fit.a, math.sqrt(max(cov[-1, -1], 0.0)), fit.df, level)
    # How often would the optimum leave the sampled sizes? Draw (v0, a) from their joint t.
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(cov[-2:, -2:] + 1e-18 * np.eye(2))
    scale = np.sqrt(fit.df / rng.chisquare(fit.df, draws))[:, None]
    v0a = np.array([fit.v0, fit.a]) + scale * (rng.standard_normal((draws, 2)) @ chol.T)
    vertices = v0a[:, :1] + v0a[:, 1:] * centred[None, :]
    outside = float(np.mean(np.any((vertices < span_low) | (vertices > span_high), axis=1)))
    info["outside_fraction"] = outside
    caveat = ""
    if not info["inside"]:
        caveat = "the fitted optimum lies outside the sampled sizes at some budget"
    elif outside > (1 - level) / 2:
        caveat = f"the optimum leaves the sampled sizes in {outside:.0%} of draws from its interval"
    return (Estimate(fit.a, low, high, f"{method}; t interval from the fit's covariance ({fit.df} df; the optimum "
                     f"leaves the sampled sizes in {outside:.0%} of draws)", caveat), fit, info)


def _numeric_jacobian(model: Callable[[np.ndarray], np.ndarray], theta: np.ndarray) -> np.ndarray:
    """Central differences; the model is a polynomial in its parameters, so they are exact to
    rounding."""
    columns = []
    for i in range(len(theta)):
        step = 1e-6 * max(1.0, abs(theta[i]))
        up, down = theta.copy(), theta.copy()
        up[i] += step
        down[i] -= step
        columns.append((model(up) - model(down)) / (2 * step))
    return np.stack(columns, axis=1)


# ------------------------------------------------------------------------- compute multiplier


@dataclass
class Multiplier:
    estimate: Estimate
    per_budget: list[dict]
    trend: Estimate  # the slope of the log-loss offset against log C (0: a constant multiplier)
    alpha: float


def _frontier(log_c: np.ndarray, log_loss: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """The baseline's frontier log L = log A − alpha·log C by least squares: the centred log C,
    its sum of squares, alpha and alpha's standard error (n − 2 df)."""
    xc = log_c - log_c.mean()
    sxx = float(xc @ xc)
    slope = float(xc @ (log_loss - log_loss.mean()) / sxx)
    resid = log_loss - log_loss.mean() - slope * xc
    return xc, sxx, -slope, math.sqrt(float(resid @ resid) / (len(log_c) - 2) / sxx)


def compute_multiplier(budgets: ArrayLike, baseline: ArrayLike, variant: ArrayLike,
                       draws: int = 4000, seed: int = 0, level: float = LEVEL) -> Multiplier:
    """How much compute the baseline needs to reach the variant's loss, C_baseline / C (> 1: the
    variant is ahead), from losses of both arms at the same budgets (paired by budget).

    The baseline's frontier is log L = log A − alpha·log C (least squares, n − 2 df). The
    variant's offset d_j = log L_variant − log L_baseline at each budget is paired, so noise a
    budget shares between the arms cancels; with a constant offset the multiplier is
    exp(−mean d / alpha). The offset's trend across budgets is tested: where its interval excludes
    0 the multiplier is taken at the largest budget from the offset's regression line instead.
    The interval draws the offset and alpha from their t distributions (they are independent: the
    offset's mean does not depend on the baseline's slope around its centred budgets)."""
    x = np.log(np.asarray(budgets, float))
    yb, yv = np.log(np.asarray(baseline, float)), np.log(np.asarray(variant, float))
    n = len(x)
    if n < 3:
        raise ValueError(f"a compute multiplier needs at least three budgets with both arms (got {n})")
    xc, sxx, alpha, se_alpha = _frontier(x, yb)
    d = yv - yb
    trend_slope = float(xc @ (d - d.mean()) / sxx)
    resid_d = d - d.mean() - trend_slope * xc
    se_trend = math.sqrt(float(resid_d @ resid_d) / (n - 2) / sxx)
    t_low, t_high = t_bounds(trend_slope, se_trend, n - 2, level)
    trend = Estimate(trend_slope, t_low, t_high, "slope of log(L_variant / L_baseline) against log C, t interval")
    rng = np.random.default_rng(seed)
    alphas = alpha + se_alpha * rng.standard_t(n - 2, draws)
    if t_low <= 0 <= t_high:  # a constant offset: its mean over the budgets, n − 1 df
        offset, se_offset, df = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(n), n - 1
        where = "constant over the budgets (its trend's interval holds 0)"
    else:  # the offset at the largest budget from its regression line, n − 2 df
        at = float(x.max() - x.mean())
        offset = float(d.mean() + trend_slope * at)
        se_offset, df = se_trend * math.sqrt(sxx / n + at**2), n - 2
        where = f"at the largest budget C = {math.exp(x.max()):.3g} (the offset trends with C)"
    offsets = offset + se_offset * rng.standard_t(df, draws)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        values = np.where(alphas > 0, np.exp(-offsets / alphas), np.nan)
    low, high = percentile(values, level)
    unbounded = float(np.mean(~(alphas > 0)))
    value = math.exp(-offset / alpha) if alpha > 0 else float("nan")
    caveat = "" if alpha > 0 else "the baseline's loss does not fall with compute"
    method = (f"paired by budget: baseline frontier L = A·C^-alpha (alpha = {alpha:.3g} ± {se_alpha:.2g}), "
              f"variant's log-loss offset {where}; t draws of both ({draws})")
    if unbounded:
        method += f"; {unbounded:.0%} of draws have a flat baseline frontier (no finite multiplier)"
    rows = [{"C": float(math.exp(c)), "baseline_loss": float(math.exp(b)), "variant_loss": float(math.exp(v)),
             "multiplier": float(math.exp(-(v - b) / alpha)) if alpha > 0 else float("nan")}
            for c, b, v in zip(x, yb, yv)]
    return Multiplier(Estimate(value, low, high, method, caveat), rows, trend, alpha)


def budget_multipliers(budgets: ArrayLike, pairs: Sequence[tuple[ArrayLike, ArrayLike]], draws: int = 4000,
                       seed: int = 0, level: float = LEVEL) -> list[Estimate]:
    """The compute multiplier at each budget (C_baseline / C for the variant's loss there, > 1: the
    variant is ahead), each with its own interval: `pairs[j]` holds the baseline's and the
    variant's final losses at budget j, one per seed and matched by seed.

    The baseline's frontier log L = log A − alpha·log C is fitted to its mean log-loss per budget
    (n − 2 df); the variant's offset at budget j is the mean over seeds of the paired log ratios,
    whose variance is pooled over the budgets (sum of (seeds − 1) df). The multiplier there is
    exp(−offset_j / alpha), and its interval draws both from their t distributions. Without two
    seeds at some budget there is no pooled noise and no interval."""
    x = np.log(np.asarray(budgets, float))
    n = len(x)
    if n < 3 or len(pairs) != n:
        raise ValueError(f"per-budget multipliers need at least three budgets, one pair of arms each (got {n} "
                         f"budgets, {len(pairs)} pairs)")
    logs = [(np.log(np.asarray(b, float)), np.log(np.asarray(v, float))) for b, v in pairs]
    _, _, alpha, se_alpha = _frontier(x, np.array([b.mean() for b, _ in logs]))
    ratios = [v - b for b, v in logs]
    df = sum(len(r) - 1 for r in ratios)
    pooled = sum(float(((r - r.mean()) ** 2).sum()) for r in ratios) / df if df > 0 else None
    rng = np.random.default_rng(seed)
    alphas = alpha + se_alpha * rng.standard_t(n - 2, draws)
    out = []
    for r in ratios:
        offset = float(r.mean())
        value = math.exp(-offset / alpha) if alpha > 0 else float("nan")
        caveat = "" if alpha > 0 else "the baseline's loss does not fall with compute"
        if pooled is None:
            out.append(Estimate(value, method="one seed per budget: no pooled seed noise, no interval", caveat=caveat))
            continue
        offsets = offset + math.sqrt(pooled / len(r)) * rng.standard_t(df, draws)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            values = np.where(alphas > 0, np.exp(-offsets / alphas), np.nan)
        low, high = percentile(values, level)
        out.append(Estimate(value, low, high, f"baseline frontier alpha = {alpha:.3g} ± {se_alpha:.2g} ({n - 2} df), "
                                              f"offset paired by seed ({df} df pooled over budgets); t draws ({draws})",
                            caveat))
    return out
