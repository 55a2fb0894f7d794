"""Repeated data vs unique data at equal tokens (Muennighoff et al. 2023)."""

from __future__ import annotations

from typing import Any

import numpy as np

from testbed.stats import paired_noise, relative_gap
from testbed.stats.curves import parametric_bootstrap, percentile
from testbed.study.base import (
    Analysis,
    Context,
    Measurement,
    Study,
    decidable,
    figure,
    measured,
    paired_by_seed,
    register,
)
from testbed.study.recipes import BATCH, base, seeds

TOLERANCE = 0.01  # "negligible": repeated data within 1% of unique data up to 4 epochs
PUBLISHED_R_STAR = 15.387756  # the paper's fitted R_D* (testbed/fit/laws/datacon.py)
# R_D* counts as finite when its interval ends below this many times the largest repeat count run
# (beyond that, repeated data would be worth its full count over every run of the study).
FINITE_FACTOR = 10


def epochs(size: str) -> list[int]:
    return [1, 4, 16] if size == "tiny" else [1, 2, 4, 8, 16]


def unique(size: str) -> int:
    return {"tiny": 8, "cpu": 48, "gpu": 1000}[size] * BATCH[size]


def sweeps(size: str) -> list[dict[str, Any]]:
    u = unique(size)
    tokens = [u * e for e in epochs(size)]
    tree = base(size)
    if size == "cpu":  # 61 U tokens per seed: a narrower model keeps 16 epochs inside the budget
        tree["model"]["d_model"] = 48
    repeated = {"name": "repetition-repeated", "base": tree,
                "grid": {"train.tokens": tokens, "train.seed": seeds(size)},
                "derived": {"data.unique_tokens": u}, "labels": ["train.tokens", "train.seed"]}
    control = {"name": "repetition-unique", "base": tree,
               "grid": {"train.tokens": tokens[1:], "train.seed": seeds(size)},
               "labels": ["train.tokens", "train.seed"]}
    return [repeated, control]


def analyse(ctx: Context) -> Analysis:
    rep = ctx.finals("repetition-repeated")
    ctl = ctx.finals("repetition-unique")
    u = float(rep["U"].iloc[0])
    gaps, rows = {}, []
    # Both arms at one seed share its initialisation: paired by seed, the noise pooled over epochs.
    pairs = {tokens: paired_by_seed(rep[rep["planned_tokens"] == tokens], ctl[ctl["planned_tokens"] == tokens])
             for tokens in sorted(set(ctl["planned_tokens"]))}
    noise = paired_noise(pairs.values())
    for tokens, (a, b) in pairs.items():
        e = round(tokens / u)
        gap = measured(f"repeated − unique at {e} epochs", relative_gap(a, b, noise, paired=True))
        gaps[e] = gap
        rows.append({"epochs": e, "tokens": int(tokens), "repeated_loss": sum(a) / len(a),
                     "unique_loss": sum(b) / len(b), "gap": gap.value, "gap_low": gap.low, "gap_high": gap.high})
    four = gaps.get(4)
    most = gaps[max(gaps)]
    headline = four if four is not None else most
    more = [g for e, g in sorted(gaps.items()) if g is not headline]
    star, fitted = _r_star(rep, ctl)
    notes = [f"U = {u:.3g} unique tokens; tolerance: {TOLERANCE:.0%}",
             f"R_D* is finite when its interval ends below {FINITE_FACTOR} x the largest repeat count "
             f"({FINITE_FACTOR * (max(epochs(ctx.size)) - 1)})"]
    if fitted:
        notes.append("fitted L(D, U) = E + B / D'^beta: " + ", ".join(f"{k} = {v:.4g}" for k, v in fitted.items()))
    return Analysis(headline, [*more, star], {"repetition": rows}, [_plot(ctx, rows)], notes)


def _law(log_params, log_unique, repeats):
    """E + B / D'^beta at log-parameters (log E, log B, log beta, log R*)."""
    from testbed.fit.laws.datacon import _log_effective  # the fitter's own D' (one formula, one place)

    e, b, beta, star = np.exp(log_params)
    return e + b * np.exp(-beta * _log_effective(log_unique, repeats, star))


def _law_jacobian(log_params, log_unique, repeats):
    """d _law / d log-parameters, exact: a fit then needs five times fewer law evaluations than
    with finite differences."""
    from testbed.fit.laws.datacon import _log_effective

    e, b, beta, star = np.exp(log_params)
    log_d = _log_effective(log_unique, repeats, star)
    term = b * np.exp(-beta * log_d)
    decay = np.exp(-repeats / star)
    # d log D' / d R* = (1 - e^(-R/R*)(1 + R/R*)) / (1 + R*(1 - e^(-R/R*)))
    d_log_d = (1 - decay * (1 + repeats / star)) / (1 + star * (1 - decay))
    return np.stack([np.full_like(term, e), term, -beta * log_d * term, -beta * term * d_log_d * star], axis=1)


def _fit_r_star(tokens: np.ndarray, unique: np.ndarray, loss: np.ndarray,
                start: dict[str, float] | None = None) -> dict[str, float] | None:
    """L = E + B / D'^beta with D' = U + U·R*·(1 - exp(-R/R*)), R = D/U - 1 (Muennighoff et al.'s
    effective data at one model size, whose N term joins E), by least squares on log-parameters,
    from four starts (or from `start` alone: a bootstrap refit)."""
    from scipy.optimize import least_squares

    repeats, log_unique = np.maximum(tokens / unique - 1, 0.0), np.log(unique)
    if not loss.min() > 2e-3:  # below E's own lower bound (a wild bootstrap draw): nothing to fit
        return None

    def residual(p):
        return _law(p, log_unique, repeats) - loss

    def jacobian(p):
        return _law_jacobian(p, log_unique, repeats)

    low, high = np.log([1e-3, 1e-6, 1e-3, 1e-2]), np.log([loss.min(), 1e12, 3.0, 1e6])
    starts = ([np.log([start["E"], start["B"], start["beta"], start["R_D*"]])] if start else
              [np.log([0.5 * loss.min(), loss.max() * np.median(tokens) ** beta0, beta0, star0])
               for beta0 in (0.2, 0.5) for star0 in (3.0, 30.0)])
    best = None
    for x0 in starts:
        fit = least_squares(residual, np.clip(x0, low + 1e-9, high - 1e-9), jac=jacobian, bounds=(low, high))
        if best is None or fit.cost < best.cost:
            best = fit
    if best is None or not best.success:
        return None
    e, b, beta, star = np.exp(best.x)
    return {"E": float(e), "B": float(b), "beta": float(beta), "R_D*": float(star)}


def _r_star(rep, ctl, draws: int = 200) -> tuple[Measurement, dict[str, float]]:
    """R_D* fitted on every run of both arms, with a parametric bootstrap of the residuals (the
    design, each run's D and U, stays as it was run)."""
    import pandas as pd

    runs = pd.concat([rep.assign(unique=rep["U"].astype(float)),
                      ctl.assign(unique=ctl["planned_tokens"].astype(float))], ignore_index=True)
    columns = [runs[c].to_numpy(float) for c in ("planned_tokens", "unique", "loss")]
    found = _fit_r_star(*columns)
    name = f"R_D* of the data-constrained law (paper: {PUBLISHED_R_STAR:.3g})"
    if found is None:
        return Measurement(name, None, how="the fit did not converge"), {}
    tokens, unique, loss = columns
    log_params = np.log([found["E"], found["B"], found["beta"], found["R_D*"]])
    fitted = _law(log_params, np.log(unique), np.maximum(tokens / unique - 1, 0.0))
    df = len(loss) - 4
    if df < 1:
        return Measurement(name, found["R_D*"], how="as many parameters as runs: no interval", unit="epochs"), found
    sd = float(np.sqrt(np.sum((loss - fitted) ** 2) / df))

    def refit(y):
        again = _fit_r_star(tokens, unique, y, start=found)
        return None if again is None else again["R_D*"]

    values = np.array([np.nan if v is None else v for v in parametric_bootstrap(refit, fitted, sd, df, draws)])
    low, high = percentile(values)
    failed = int(np.sum(~np.isfinite(values)))
    # E is bounded by the lowest loss: a fit that presses against it has no floor of its own.
    caveat = ("E at its bound (the lowest loss)" if found["E"] >= 0.999 * loss.min()
              else "E at its lower bound" if found["E"] <= 1.001e-3 else "")
    how = (f"least squares on every run of both arms; parametric bootstrap of the residuals ({draws} refits, "
           f"{failed} failed and counted beyond the interval's ends)")
    return Measurement(name, found["R_D*"], low, high, "epochs", how, caveat), found


def _plot(ctx: Context, rows: list[dict]) -> str:
    with figure(ctx.out / "repetition.png", "epochs over U (tokens D = epochs x U)", log_base=2) as ax:
        ax.plot([r["epochs"] for r in rows], [r["repeated_loss"] for r in rows], "o-", label="U repeated")
        ax.plot([r["epochs"] for r in rows], [r["unique_loss"] for r in rows], "s-", label="unique data")
    return "repetition.png"


def verdict(analysis: Analysis) -> tuple[str, str]:
    from testbed.study.base import at_most

    four = at_most(analysis.headline, TOLERANCE)
    gaps = [m for m in analysis.more if m.name.startswith("repeated")]
    last = gaps[-1] if gaps else None
    star = next((m for m in analysis.more if m.name.startswith("R_D*")), None)
    limit = FINITE_FACTOR * 15  # the cpu and gpu sizes repeat up to 16 epochs (15 repeats)
    finite = ("inconclusive" if star is None or not decidable(star)
              else "agree" if star.high <= limit else "disagree" if star.low > limit else "inconclusive")
    # Diminishing returns: at the most epochs the repeated run is clearly worse.
    beyond = ("inconclusive" if last is None or not decidable(last)
              else "agree" if last.low > TOLERANCE else "disagree" if last.high <= TOLERANCE else "inconclusive")
    parts = f"up to 4 epochs: {four}; at the most epochs (repetition should hurt): {beyond}; R_D* finite: {finite}"
    if "disagree" in (four, beyond, finite):
        return "disagree", parts
    if four == beyond == finite == "agree":
        return "agree", "4 epochs within the tolerance, the most epochs clearly worse, and R_D* finite"
    return "inconclusive", f"{parts} (intervals missing or straddling)"


register(Study(
    name="repetition", version=3,
    changes="statistics: gaps paired by seed (seeds now vary the data order too) with the seed noise pooled "
            "over epochs; R_D*'s interval from a parametric bootstrap of the residuals instead of resampling "
            "runs, and no verdict on it while E sits at its bound.",
    paper="Muennighoff et al. 2023, Scaling Data-Constrained Language Models",
    claim="Training up to ~4 epochs on repeated data is almost as good as unique data at the same "
          "token count; by 16 epochs the repeated tokens are worth clearly less; the data-constrained "
          "law fits with a finite R_D* (15.4 in the paper).",
    sweeps=sweeps, analyse=analyse, verdict=verdict,
    caveat="The paper's models are far from memorising U; small models on small U are, so "
           "repetition may hurt earlier (or, on a simple language, not at all).",
))
