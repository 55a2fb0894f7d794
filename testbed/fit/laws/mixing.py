"""Data mixing laws (Ye et al. 2024, "Data Mixing Laws"): each validation source's loss against
the training mixture's proportions r (one run per mixture, N and D the same for every run),

    L_i(r) = c_i + k_i * exp(sum_j t_ij r_j).

Redundancy: the proportions sum to 1, so adding a constant a to every t_ij of one source only
rescales k_i by exp(a). It is removed by fixing t_iK = 0 for the last mixture component K (the
last `weight/<name>` column of the table): the other t_ij are then the effect of moving weight
from K to j. Each source has K + 1 fitted parameters (c, k, t_1..t_{K-1}); a fit needs one more
mixture than that, so a residual is left to measure the noise by.

Fitted per source by least squares on log-loss (scipy.optimize.least_squares), from starts where
c is a fraction of the smallest loss and log(L - c) is linear in r (an exact linear fit). The
mixture's own loss on an unseen mixture is predicted as sum_i r_i L_i(r) (the paper's use), when
the validation sources are the mixture's components.

Intervals come from the fit's covariance (s^2 (J'J)^-1 on log-loss, t quantiles with n - p degrees
of freedom): no design point (mixture) is resampled. A prediction's interval covers the law's
value at that mixture; the new-run interval adds one run's scatter. Coverage is measured in
tests/test_mixing_law.py on simulated tables.

`--variant regmix`: a RegMix-style regression (Liu et al. 2024) in place of the law: per source,
a ridge regression of log-loss on the weights and their pairwise products (no intercept: the
weights sum to 1), K + K(K-1)/2 coefficients, point predictions only (no intervals).

Not a `Law` of the registry: its parameter count depends on the number of mixture components,
and its rows are mixtures, not model sizes; `testbed fit TABLE --law mixing` dispatches here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps
from scipy.optimize import least_squares, minimize

from testbed.errors import TestbedError
from testbed.fit.points.rules import rule_mask
from testbed.fit.points.table import load_points, read_source

FORMULA = "L_i(r) = c_i + k_i * exp(sum_j t_ij r_j)"
LEVEL = 0.95
WEIGHT_PREFIX = "weight/"
SUM_TOL = 1e-3  # |sum of a row's weights - 1| allowed
EDGE_TOL = 0.02  # an optimum's weight within this of its sampled range's end is at the edge
C_FRACTIONS = (0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.98, 0.995)
VARIANTS = ("free", "regmix")  # free: the law of Ye et al.; regmix: the regression of Liu et al.
RIDGE = 1e-4  # regmix's ridge penalty, per mixture, on its coefficients
REGMIX_FORMULA = "log L_i(r) = sum_j b_ij r_j + sum_{j<l} b_ijl r_j r_l  (ridge)"


def source_column(name: str) -> str:
    return f"source/{name}/val_loss"


def source_name(column: str) -> str:
    return column[len("source/"):-len("/val_loss")] if column.startswith("source/") else column


def n_params(components: int, variant: str = "free") -> int:
    """Fitted parameters per source: c, k and one t per component but the last (fixed to 0);
    for regmix one coefficient per weight and per pair of weights."""
    if variant == "regmix":
        return components + components * (components - 1) // 2
    return components + 1


def min_mixtures(components: int, variant: str = "free") -> int:
    return n_params(components, variant) + 1


# ---------------------------------------------------------------- the table
@dataclass
class Mixtures:
    frame: pd.DataFrame  # one row per mixture (run)
    components: list[str]  # weight names, in table order; the last is the reference (t = 0)
    targets: list[str]  # fitted loss columns (source/<name>/val_loss)
    overall: str | None = None  # the mixture's own loss column (val_loss or loss), if any
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def weights(self) -> np.ndarray:
        return self.frame[[WEIGHT_PREFIX + c for c in self.components]].to_numpy(float)

    @property
    def labels(self) -> list[str]:
        if "run_id" in self.frame.columns:
            return [str(v) for v in self.frame["run_id"]]
        return [f"row {i}" for i in range(len(self.frame))]


def check_weights(weights: np.ndarray, labels: list[str], components: list[str]) -> None:
    if ((weights < -1e-12) | (weights > 1 + 1e-12)).any():
        bad = int(((weights < -1e-12) | (weights > 1 + 1e-12)).any(axis=1).sum())
        raise TestbedError(f"{bad} mixture(s) hold a weight outside [0, 1]; weight/<name> columns are proportions.")
    sums = weights.sum(axis=1)
    off = np.abs(sums - 1.0) > SUM_TOL
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise TestbedError(
            f"the weights of {int(off.sum())} mixture(s) do not sum to 1 (e.g. {labels[i]}: {sums[i]:.4g} over "
            f"{', '.join(WEIGHT_PREFIX + c for c in components)}); every weight/<name> column of the mixture must be "
            f"in the table, as proportions.")


def load_mixtures(source: str | Path | pd.DataFrame, target: str | None = None, columns: str | None = None,
                  where: list[str] | None = None) -> Mixtures:
    """The mixtures of a table or sweep: `weight/<name>` columns, the loss columns to fit
    (`target`, else every `source/<name>/val_loss`), final points only, one N and D."""
    frame = source if isinstance(source, pd.DataFrame) else read_source(source)
    components = [str(c)[len(WEIGHT_PREFIX):] for c in frame.columns if str(c).startswith(WEIGHT_PREFIX)]
    if len(components) < 2:
        raise TestbedError(f"--law mixing needs two or more weight/<name> columns (the mixture's proportions); "
                           f"the table has {len(components)}.")
    sources = [str(c) for c in frame.columns if str(c).startswith("source/") and str(c).endswith("/val_loss")]
    if target is not None:
        if target not in frame.columns:
            raise TestbedError(f"--target {target!r} is not a column of the table; use one of "
                               f"{', '.join(sources) or 'its source/<name>/val_loss columns (none here)'}.")
        targets = [target]
    elif sources:
        targets = sources
    else:
        raise TestbedError("the table has no source/<name>/val_loss columns; name the loss to fit with --target COLUMN.")
    overall = next((c for c in ("val_loss", "loss") if c in frame.columns and c not in targets), None)
    weight_cols = [WEIGHT_PREFIX + c for c in components]
    points = load_points(frame, tuple(weight_cols + targets), tuple(targets), columns, "final")
    mixtures = points.frame
    dropped = dict(points.dropped)
    for rule in where or []:
        keep = rule_mask(mixtures, rule, "--where")
        if (~keep).any():
            dropped[f"--where {rule}"] = int((~keep).sum())
        mixtures = mixtures.loc[keep].reset_index(drop=True)
    for name in ("N", "D"):
        if name in mixtures.columns:
            values = pd.to_numeric(mixtures[name], errors="coerce").dropna().unique()
            if len(values) > 1:
                raise TestbedError(
                    f"--law mixing fits runs of one model size and token count, but the mixtures hold "
                    f"{len(values)} values of {name} ({', '.join(f'{v:.4g}' for v in sorted(values)[:4])}); "
                    f"keep one with --where '{name}=={sorted(values)[-1]:.6g}'.")
    out = Mixtures(mixtures, components, targets, overall, dropped)
    check_weights(out.weights, out.labels, components)
    return out


# ---------------------------------------------------------------- one source's fit
def _design(weights: np.ndarray) -> np.ndarray:
    """The proportions that carry a t: all but the last (t_K = 0)."""
    return np.asarray(weights, float)[:, :-1]


def _log_predict(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    c, log_k, t = theta[0], theta[1], theta[2:]
    return np.log(c + np.exp(log_k + x @ t))


def _log_jacobian(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    c, log_k, t = theta[0], theta[1], theta[2:]
    term = np.exp(log_k + x @ t)
    total = c + term
    share = term / total
    return np.column_stack([1.0 / total, share, share[:, None] * x])


@dataclass
class SourceFit:
    target: str
    components: list[str]
    theta: np.ndarray  # (c, log k, t_1..t_{K-1})
    cov: np.ndarray  # covariance of theta
    residual_sd: float  # on log-loss
    df: int
    n: int
    converged: bool
    at_bound: list[str] = field(default_factory=list)

    @property
    def params(self) -> dict[str, float]:
        out = {"c": float(self.theta[0]), "k": float(np.exp(self.theta[1]))}
        for name, value in zip(self.components, list(self.theta[2:]) + [0.0]):
            out[f"t_{name}"] = float(value)
        return out

    def param_intervals(self, level: float = LEVEL) -> dict[str, tuple[float, float]]:
        q = sps.t.ppf(0.5 + level / 2, self.df)
        se = np.sqrt(np.maximum(np.diag(self.cov), 0.0))
        low, high = self.theta - q * se, self.theta + q * se
        out = {"c": (float(low[0]), float(high[0])), "k": (float(np.exp(low[1])), float(np.exp(high[1])))}
        for i, name in enumerate(self.components[:-1]):
            out[f"t_{name}"] = (float(low[2 + i]), float(high[2 + i]))
        return out

    def predict(self, weights: np.ndarray) -> np.ndarray:
        return np.exp(_log_predict(self.theta, _design(np.atleast_2d(weights))))

    def interval(self, weights: np.ndarray, level: float = LEVEL, new_run: bool = False, runs: int = 1
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prediction, low, high) at each mixture: the law's value there, or with `new_run` the
        geometric mean loss of `runs` new runs there (adding the residual scatter over `runs`)."""
        x = _design(np.atleast_2d(weights))
        centre = _log_predict(self.theta, x)
        grad = _log_jacobian(self.theta, x)
        var = np.einsum("np,pq,nq->n", grad, self.cov, grad)
        if new_run:
            var = var + self.residual_sd ** 2 / runs
        q = sps.t.ppf(0.5 + level / 2, self.df)
        half = q * np.sqrt(np.maximum(var, 0.0))
        return np.exp(centre), np.exp(centre - half), np.exp(centre + half)


def check_count(n: int, components: int, what: str = "mixtures", variant: str = "free") -> None:
    need = min_mixtures(components, variant)
    if n < need:
        form = ("the regmix regression" if variant == "regmix" else "the mixing law")
        parts = ("one per weight and pair of weights" if variant == "regmix" else f"c, k and {components - 1} t's")
        raise TestbedError(
            f"{form} with {components} components has {n_params(components, variant)} parameters per source "
            f"({parts}) and needs at least {need} {what}, but {n} remain; add runs on other mixtures.")


def fit_source(weights: np.ndarray, loss: np.ndarray, components: list[str], target: str = "loss") -> SourceFit:
    """Least squares on log-loss of L = c + k exp(t . r) for one validation source."""
    weights, loss = np.asarray(weights, float), np.asarray(loss, float)
    n, k_comp = weights.shape
    check_count(n, k_comp)
    x = _design(weights)
    basis = np.column_stack([np.ones(n), x])
    if np.linalg.matrix_rank(basis) < k_comp:
        raise TestbedError(f"the {n} mixtures span only {np.linalg.matrix_rank(basis) - 1} of the {k_comp - 1} "
                           f"directions of the simplex; vary every component's weight.")
    y = np.log(loss)
    lower = np.r_[0.0, -50.0, np.full(k_comp - 1, -60.0)]
    upper = np.r_[loss.max(), 20.0, np.full(k_comp - 1, 60.0)]
    best = None
    for fraction in C_FRACTIONS:
        c0 = fraction * loss.min()
        z = np.log(loss - c0)
        coef = np.linalg.lstsq(basis, z, rcond=None)[0]
        start = np.clip(np.r_[c0, coef], lower + 1e-9, upper - 1e-9)
        try:
            result = least_squares(lambda th: _log_predict(th, x) - y, start,
                                   jac=lambda th: _log_jacobian(th, x), bounds=(lower, upper), method="trf",
                                   x_scale="jac", max_nfev=400)
        except ValueError:
            continue
        if np.isfinite(result.cost) and (best is None or result.cost < best.cost):
            best = result
    if best is None:
        raise TestbedError(f"the mixing law could not be fitted to {target}: every start failed.")
    theta = best.x
    p = len(theta)
    df = n - p
    rss = float(2 * best.cost)
    s2 = rss / df
    jac = _log_jacobian(theta, x)
    cov = s2 * np.linalg.pinv(jac.T @ jac)
    span = upper - lower
    names = ["c", "k"] + [f"t_{c}" for c in components[:-1]]
    at_bound = [names[i] for i in range(p) if min(theta[i] - lower[i], upper[i] - theta[i]) < 1e-3 * span[i]]
    return SourceFit(target, list(components), theta, cov, math.sqrt(s2), df, n, bool(best.success), at_bound)


# ---------------------------------------------------------------- RegMix (Liu et al. 2024)
def _regmix_features(weights: np.ndarray) -> np.ndarray:
    w = np.atleast_2d(np.asarray(weights, float))
    pairs = [w[:, j] * w[:, m] for j in range(w.shape[1]) for m in range(j + 1, w.shape[1])]
    return np.column_stack([w, *pairs]) if pairs else w


@dataclass
class RegMixFit:
    target: str
    components: list[str]
    coef: np.ndarray
    residual_sd: float
    df: int
    n: int
    at_bound: list[str] = field(default_factory=list)

    @property
    def params(self) -> dict[str, float]:
        c = self.components
        names = [f"b_{a}" for a in c] + [f"b_{a}*{b}" for i, a in enumerate(c) for b in c[i + 1:]]
        return {name: float(v) for name, v in zip(names, self.coef)}

    def param_intervals(self, level: float = LEVEL) -> dict[str, tuple[float, float]]:
        return {}  # point predictions only

    def predict(self, weights: np.ndarray) -> np.ndarray:
        return np.exp(_regmix_features(weights) @ self.coef)


def fit_regmix(weights: np.ndarray, loss: np.ndarray, components: list[str], target: str = "loss") -> RegMixFit:
    weights, loss = np.asarray(weights, float), np.asarray(loss, float)
    n, k_comp = weights.shape
    check_count(n, k_comp, variant="regmix")
    x = _regmix_features(weights)
    y = np.log(loss)
    p = x.shape[1]
    coef = np.linalg.solve(x.T @ x + RIDGE * n * np.eye(p), x.T @ y)
    rss = float(np.sum((y - x @ coef) ** 2))
    return RegMixFit(target, list(components), coef, math.sqrt(rss / (n - p)), n - p, n)


# ---------------------------------------------------------------- all sources, holdout, optimum
@dataclass
class MixingFit:
    components: list[str]
    fits: dict[str, SourceFit | RegMixFit]
    weights: np.ndarray  # the fitted mixtures
    variant: str = "free"

    @property
    def composes_overall(self) -> bool:
        """The validation sources are the mixture's components, so its own loss is sum r_i L_i."""
        return sorted(source_name(t) for t in self.fits) == sorted(self.components)

    def predict(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        weights = np.atleast_2d(np.asarray(weights, float))
        out = {target: f.predict(weights) for target, f in self.fits.items()}
        if self.composes_overall:
            out["overall"] = sum(weights[:, self.components.index(source_name(t))] * v for t, v in list(out.items()))
        return out


def fit_mixing(mixtures: Mixtures, variant: str = "free") -> MixingFit:
    if variant not in VARIANTS:
        raise TestbedError(f"--variant {variant!r} is unknown for --law mixing; use free (Ye et al.) or regmix.")
    w = mixtures.weights
    one = fit_regmix if variant == "regmix" else fit_source
    fits: dict[str, SourceFit | RegMixFit] = {
        t: one(w, mixtures.frame[t].to_numpy(float), mixtures.components, t) for t in mixtures.targets}
    return MixingFit(list(mixtures.components), fits, w, variant)


def holdout(mixtures: Mixtures, rule: str | None = None, variant: str = "free") -> list[dict]:
    """Fit on some mixtures, predict the others: the mixtures a `rule` matches (e.g.
    'weight/web>0.6'), else each mixture in turn (leave one mixture out). One row per held-out
    mixture: its weights, each target's observed and predicted loss and relative error, and the
    mixture's own loss (sum r_i L_i) where the table has it."""
    n = len(mixtures.frame)
    if rule:
        held = rule_mask(mixtures.frame, rule, "--holdout")
        if held.all() or not held.any():
            raise TestbedError(f"--holdout {rule!r} holds out {int(held.sum())} of {n} mixtures; hold out some, not all.")
        splits = [held]
    else:
        splits = [np.arange(n) == i for i in range(n)]
    check_count(n - int(splits[0].sum()), len(mixtures.components), "fitted mixtures after the holdout", variant)
    rows = []
    w = mixtures.weights
    for held in splits:
        train = Mixtures(mixtures.frame.loc[~held].reset_index(drop=True), mixtures.components, mixtures.targets,
                         mixtures.overall)
        fitted = fit_mixing(train, variant)
        for i in np.flatnonzero(held):
            pred = fitted.predict(w[i])
            row: dict = {"mixture": mixtures.labels[i],
                         "weights": {c: float(v) for c, v in zip(mixtures.components, w[i])}, "losses": {}}
            for target in mixtures.targets:
                observed = float(mixtures.frame[target].iloc[i])
                predicted = float(pred[target][0])
                row["losses"][target] = {"observed": observed, "predicted": predicted,
                                         "rel_error": (predicted - observed) / observed}
                one = fitted.fits[target]
                if isinstance(one, SourceFit):
                    _, low, high = one.interval(w[i], new_run=True)
                    row["losses"][target]["new_run_interval"] = [float(low[0]), float(high[0])]
            if "overall" in pred and mixtures.overall is not None:
                observed = float(mixtures.frame[mixtures.overall].iloc[i])
                predicted = float(pred["overall"][0])
                row["losses"][mixtures.overall] = {"observed": observed, "predicted": predicted,
                                                   "rel_error": (predicted - observed) / observed}
            rows.append(row)
    return rows


def _simplex_optimum(objective, starts: np.ndarray, bounds: list[tuple[float, float]]) -> np.ndarray:
    best, best_value = None, np.inf
    constraint = {"type": "eq", "fun": lambda r: r.sum() - 1.0, "jac": lambda r: np.ones_like(r)}
    for start in starts:
        start = np.clip(start, [lo for lo, _ in bounds], [hi for _, hi in bounds])
        result = minimize(objective, start, method="SLSQP", bounds=bounds, constraints=[constraint],
                          options={"maxiter": 300, "ftol": 1e-12})
        value = objective(result.x)
        if np.isfinite(value) and value < best_value and abs(result.x.sum() - 1) < 1e-6:
            best, best_value = result.x, value
    if best is None:
        raise TestbedError("the optimal mixture could not be found: every start of the optimiser failed.")
    return np.clip(best, 0.0, 1.0)


def optimal_mixture(fit: MixingFit, target: dict[str, float] | None = None) -> dict:
    """The mixture minimising sum_i s_i L_i(r) (s: `target`, validation column -> weight;
    default equal weights over the fitted sources), within the range of each weight the fitted
    mixtures sampled, and over the whole simplex. An optimum within EDGE_TOL of an end of a
    weight's sampled range is labelled: the law was not checked beyond it, so it is no result."""
    target = target or {t: 1.0 / len(fit.fits) for t in fit.fits}
    total = sum(target.values())
    shares = {t: v / total for t, v in target.items()}

    def objective(r: np.ndarray) -> float:
        return float(sum(s * fit.fits[t].predict(r)[0] for t, s in shares.items()))

    low, high = fit.weights.min(axis=0), fit.weights.max(axis=0)
    vertices = np.eye(len(fit.components))
    starts = np.vstack([fit.weights, vertices, np.full(len(fit.components), 1.0 / len(fit.components))])
    inside = _simplex_optimum(objective, starts, list(zip(low, high)))
    whole = _simplex_optimum(objective, starts, [(0.0, 1.0)] * len(fit.components))
    edges = [f"{c} at the {'low' if r - lo < EDGE_TOL else 'high'} end of its sampled range "
             f"[{lo:.3g}, {hi:.3g}]" for c, r, lo, hi in zip(fit.components, inside, low, high)
             if r - lo < EDGE_TOL or hi - r < EDGE_TOL]
    beyond = float(np.max(np.maximum(low - whole, whole - high)))
    return {
        "objective": "sum_i s_i L_i(r), s = " + ", ".join(f"{source_name(t)} {s:.3g}" for t, s in shares.items()),
        "weights": {c: float(v) for c, v in zip(fit.components, inside)},
        "loss": objective(inside),
        "at_edge": edges,
        "status": ("at the edge of the sampled region: " + "; ".join(edges) + " (the optimum may lie beyond; "
                   "not a result)") if edges else "inside the sampled region",
        "simplex_optimum": {c: float(v) for c, v in zip(fit.components, whole)},
        "simplex_loss": objective(whole),
        "simplex_beyond_sampled": max(beyond, 0.0),
    }


# ---------------------------------------------------------------- the command
def report_lines(mixtures: Mixtures, fit: MixingFit, rows: list[dict], optimum: dict | None, rule: str | None) -> list[str]:
    comps = mixtures.components
    lines = [f"mixing law (Ye et al. 2024): {FORMULA}" if fit.variant == "free" else
             f"regmix regression (Liu et al. 2024): {REGMIX_FORMULA}, ridge {RIDGE:g} per mixture",
             f"{len(mixtures.frame)} mixtures of {len(comps)} components ({', '.join(comps)}); t_{comps[-1]} = 0 "
             f"(the weights sum to 1, so one t per source is redundant)" if fit.variant == "free" else
             f"{len(mixtures.frame)} mixtures of {len(comps)} components ({', '.join(comps)}); no intercept "
             f"(the weights sum to 1)"]
    for reason, count in mixtures.dropped.items():
        lines.append(f"dropped {count} rows: {reason}")
    for target, f in fit.fits.items():
        ci = f.param_intervals()
        params = ", ".join(f"{k} {v:.4g}" + (f" [{ci[k][0]:.4g}, {ci[k][1]:.4g}]" if k in ci else
                                             " (fixed)" if fit.variant == "free" else "")
                           for k, v in f.params.items())
        lines.append(f"{target}: {params}; residual SD {f.residual_sd:.3%} (log-loss), {f.df} df"
                     + (f"; at bound: {', '.join(f.at_bound)}" if f.at_bound else ""))
    lines.append("95% intervals from the fit's covariance (t, n - p df): they cover the law's value, given its form"
                 if fit.variant == "free" else "point estimates only: regmix has no intervals")
    how = f"--holdout {rule}" if rule else "leave one mixture out"
    errors = [abs(v["rel_error"]) for r in rows for v in r["losses"].values()]
    lines.append(f"held-out mixtures ({how}): mean absolute relative error {np.mean(errors):.3%} over {len(rows)} mixture(s)")
    for r in rows:
        mix = ", ".join(f"{c} {v:.3g}" for c, v in r["weights"].items())
        errs = ", ".join(f"{source_name(t)} {v['rel_error']:+.3%}" for t, v in r["losses"].items())
        lines.append(f"  {r['mixture']} ({mix}): {errs}")
    if optimum is not None:
        mix = ", ".join(f"{c} {v:.3f}" for c, v in optimum["weights"].items())
        lines.append(f"optimal mixture ({optimum['objective']}): {mix}; predicted {optimum['loss']:.4g}; "
                     f"{optimum['status']}")
        whole = ", ".join(f"{c} {v:.3f}" for c, v in optimum["simplex_optimum"].items())
        if optimum["simplex_beyond_sampled"] > EDGE_TOL:
            lines.append(f"  over the whole simplex: {whole}; predicted {optimum['simplex_loss']:.4g}, "
                         f"{optimum['simplex_beyond_sampled']:.3g} beyond the sampled range of a weight "
                         f"(an extrapolation of the law)")
    return lines


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def run_cli(args) -> int:
    """`testbed fit SOURCE --law mixing [--target COLUMN] [--holdout RULE] [--where RULE] [--out DIR]`."""
    import json

    target = getattr(args, "target", None)
    unused = {"--bootstrap": args.bootstrap, "--by": args.by, "--fix": args.fix,
              "--weight": args.weight != "none", "--budgets": args.budgets}
    given = [flag for flag, value in unused.items() if value]
    if given:
        raise TestbedError(f"--law mixing does not take {', '.join(given)}; leave it out (its intervals come from "
                           f"the fit's covariance; docs/fit.md, Mixing laws).")
    if args.variant not in VARIANTS:
        raise TestbedError(f"--variant {args.variant!r} is unknown for --law mixing; use free (Ye et al.) or regmix.")
    mixtures = load_mixtures(args.source, target, args.columns, args.where)
    fit = fit_mixing(mixtures, args.variant)
    rows = holdout(mixtures, args.holdout, args.variant)
    optimum = optimal_mixture(fit, {target: 1.0} if target else None)
    lines = report_lines(mixtures, fit, rows, optimum, args.holdout)
    print("\n".join(lines))
    out_dir = Path(args.out or "fit_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"law": "mixing", "variant": fit.variant, "formula": FORMULA if fit.variant == "free" else REGMIX_FORMULA, "components": mixtures.components, "reference": mixtures.components[-1],
               "fits": {t: {"params": f.params, "intervals": f.param_intervals(), "residual_sd": f.residual_sd,
                            "df": f.df, "at_bound": f.at_bound} for t, f in fit.fits.items()},
               "holdout": rows, "optimum": optimum, "dropped": mixtures.dropped}
    (out_dir / "fit.json").write_text(json.dumps(_plain(summary), indent=2) + "\n")
    (out_dir / "report.md").write_text("# Mixing law\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    print(f"report: {out_dir / 'report.md'}; fit: {out_dir / 'fit.json'}")
    return 0
