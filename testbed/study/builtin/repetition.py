"""Repeated data vs unique data at equal tokens (Muennighoff et al. 2023).

At each model size a unique budget U of a quarter of the model's compute-optimal tokens
(TOKENS_PER_PARAMETER x N_nv), so its 4-epoch point repeats U at about compute-optimal D; runs at
1-16 epochs of U against runs on unique data at the same D, paired by seed, and the
data-constrained law's R_D* fitted on both arms of each size.
"""

from __future__ import annotations

import re
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
    upper_end,
)
from testbed.study.recipes import BATCH, base, seeds, small_vocab_base

TOLERANCE = 0.01  # "negligible": repeated data within 1% of unique data up to 4 epochs
PUBLISHED_R_STAR = 15.387756  # the paper's fitted R_D* (testbed/fit/laws/datacon.py)
# R_D* counts as finite when its interval ends below this many times the largest repeat count run
# (beyond that, repeated data would be worth its full count over every run of the study).
FINITE_FACTOR = 10
# D at 4 epochs, per non-embedding parameter: Chinchilla's ~20, so U = D / 4 is what a
# compute-optimal run of the model would see four times (v3 ran its 4 epochs at 3.5 tokens per
# parameter, where repetition barely shows). tiny: mechanics only.
TOKENS_PER_PARAMETER = {"tiny": 1, "cpu": 20, "gpu": 20}
# (d_model, n_layers, n_heads). cpu: two narrow models on the 512-token BPE (N_nv 14k and 56k) so
# 80 N tokens (16 epochs) fit, both at two seeds; a third size (d_model 16, 8k) would not fit with
# them. gpu: 6M and 25M.
MODELS = {"tiny": [(8, 2, 1), (16, 2, 2)], "cpu": [(24, 2, 2), (48, 2, 2)], "gpu": [(256, 8, 4), (512, 8, 8)]}
# One LR per size, falling as 1/d_model (chinchilla's rule): both arms share it and the claim is
# their gap at equal D; a grid would triple the runs. tiny keeps its base LR.
LR_CENTRE = {"cpu": 6e-3, "gpu": 2e-3}
LR_WIDTH = {"cpu": 32, "gpu": 512}


def epochs(size: str) -> list[int]:
    return [1, 4, 16] if size == "tiny" else [1, 2, 4, 8, 16]


def _tree(size: str, model: tuple[int, int, int]) -> dict[str, Any]:
    tree = small_vocab_base(size) if size == "cpu" else base(size)
    d, layers, heads = model
    tree["model"].update(d_model=d, n_layers=layers, n_heads=heads)
    if size in LR_CENTRE:
        tree["optim"]["lr"] = round(LR_CENTRE[size] * LR_WIDTH[size] / d, 8)
    return tree


def n_nv(tree: dict[str, Any]) -> int:
    """The model's non-embedding parameters (any vocabulary: they do not depend on it)."""
    from testbed.config import ModelConfig
    from testbed.model.counting import count_params

    return count_params(ModelConfig(**{"vocab_size": 512, **tree["model"]})).non_embedding


def unique(size: str, tree: dict[str, Any]) -> int:
    """U: a quarter of the model's TOKENS_PER_PARAMETER x N_nv tokens, in whole batches."""
    batch = BATCH[size]
    return max(1, round(TOKENS_PER_PARAMETER[size] * n_nv(tree) / 4 / batch)) * batch


def sweeps(size: str) -> list[dict[str, Any]]:
    specs = []
    for model in MODELS[size]:
        tree = _tree(size, model)
        u = unique(size, tree)
        tokens = [u * e for e in epochs(size)]
        repeated = {"name": f"repetition-repeated-d{model[0]}", "base": tree,
                    "grid": {"train.tokens": tokens, "train.seed": seeds(size)},
                    "derived": {"data.unique_tokens": u}, "labels": ["train.tokens", "train.seed"]}
        # 1 epoch of U is unique data: the repeated arm's run is the control there
        control = {"name": f"repetition-unique-d{model[0]}", "base": tree,
                   "grid": {"train.tokens": tokens[1:], "train.seed": seeds(size)},
                   "labels": ["train.tokens", "train.seed"]}
        specs += [repeated, control]
    return specs


def _gap_name(e: int, n: float) -> str:
    return f"repeated − unique at {e} epochs (N_nv {n:.3g})"


def analyse(ctx: Context) -> Analysis:
    gaps, rows, stars, fits = [], [], [], []
    for model in MODELS[ctx.size]:
        rep = ctx.finals(f"repetition-repeated-d{model[0]}")
        ctl = ctx.finals(f"repetition-unique-d{model[0]}")
        u, n = float(rep["U"].iloc[0]), float(rep["N_non_embedding"].iloc[0])
        # Both arms at one seed share its initialisation: paired by seed, the noise pooled over epochs.
        pairs = {tokens: paired_by_seed(rep[rep["planned_tokens"] == tokens], ctl[ctl["planned_tokens"] == tokens])
                 for tokens in sorted(set(ctl["planned_tokens"]))}
        noise = paired_noise(pairs.values())
        for tokens, (a, b) in pairs.items():
            e = round(tokens / u)
            gap = measured(_gap_name(e, n), relative_gap(a, b, noise, paired=True))
            gaps.append(gap)
            rows.append({"N_nv": n, "U": int(u), "epochs": e, "tokens": int(tokens),
                         "tokens_per_N_nv": tokens / n, "repeated_loss": sum(a) / len(a),
                         "unique_loss": sum(b) / len(b), "gap": gap.value, "gap_low": gap.low, "gap_high": gap.high})
        star, fitted = _r_star(rep, ctl, f"N_nv {n:.3g}")
        stars.append(star)
        if fitted:
            fits.append(f"N_nv {n:.3g}: " + ", ".join(f"{k} = {v:.4g}" for k, v in fitted.items()))
    # The headline: the 4-epoch gap whose interval reaches highest, over the sizes.
    four = [g for g in gaps if " at 4 epochs" in g.name] or gaps
    headline = max(four, key=upper_end)
    more = [g for g in gaps if g is not headline] + stars
    notes = [f"U = {TOKENS_PER_PARAMETER[ctx.size]:g} x N_nv / 4 tokens per size (4 epochs at "
             f"{TOKENS_PER_PARAMETER[ctx.size]:g} tokens per non-embedding parameter); tolerance: {TOLERANCE:.0%}; "
             "the rule applies at every size",
             f"R_D* is finite when its interval ends below {FINITE_FACTOR} x the largest repeat count "
             f"({FINITE_FACTOR * (max(epochs(ctx.size)) - 1)})",
             "R_N* (excess parameters) is not measured: each size trains on its own compute-optimal U, so no "
             "model is larger than U calls for, and two sizes cannot separate the law's N term (A, alpha) from R_N*",
             *("fitted L(D, U) = E + B / D'^beta, " + f for f in fits)]
    return Analysis(headline, more, {"repetition": rows}, [_plot(ctx, rows)], notes)


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


def _r_star(rep, ctl, where: str, draws: int = 200) -> tuple[Measurement, dict[str, float]]:
    """R_D* fitted on every run of both arms at one model size (`where` names it), with a
    parametric bootstrap of the residuals (the design, each run's D and U, stays as it was run)."""
    import pandas as pd

    runs = pd.concat([rep.assign(unique=rep["U"].astype(float)),
                      ctl.assign(unique=ctl["planned_tokens"].astype(float))], ignore_index=True)
    columns = [runs[c].to_numpy(float) for c in ("planned_tokens", "unique", "loss")]
    found = _fit_r_star(*columns)
    name = f"R_D* of the data-constrained law ({where}; paper: {PUBLISHED_R_STAR:.3g})"
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
        for n in sorted({r["N_nv"] for r in rows}):
            mine = [r for r in rows if r["N_nv"] == n]
            line = ax.plot([r["epochs"] for r in mine], [r["repeated_loss"] for r in mine], "o-",
                           label=f"U repeated (N_nv {n:.3g})")
            ax.plot([r["epochs"] for r in mine], [r["unique_loss"] for r in mine], "s--",
                    color=line[0].get_color(), label=f"unique data (N_nv {n:.3g})")
    return "repetition.png"


def _joint(parts: list[str]) -> str:
    """Every size's part of one rule as one: disagree when any size disagrees, agree when all agree."""
    return "disagree" if "disagree" in parts else "agree" if parts and all(p == "agree" for p in parts) \
        else "inconclusive"


def verdict(analysis: Analysis) -> tuple[str, str]:
    from testbed.study.base import at_most

    gaps = [m for m in [analysis.headline, *analysis.more] if m.name.startswith("repeated")]
    by_size: dict[str, list[tuple[int, Measurement]]] = {}
    for m in gaps:
        found = re.match(r"repeated − unique at (\d+) epochs \((.*)\)", m.name)
        if found:
            by_size.setdefault(found.group(2), []).append((int(found.group(1)), m))
    four = _joint([at_most(m, TOLERANCE) for sized in by_size.values() for e, m in sized if e == 4])
    # Diminishing returns: at the most epochs the repeated run is clearly worse, at every size.
    lasts = [max(sized, key=lambda em: em[0])[1] for sized in by_size.values()]
    beyond = _joint(["inconclusive" if not decidable(m)
                     else "agree" if m.low > TOLERANCE else "disagree" if m.high <= TOLERANCE else "inconclusive"
                     for m in lasts])
    limit = FINITE_FACTOR * 15  # the cpu and gpu sizes repeat up to 16 epochs (15 repeats)
    stars = [m for m in analysis.more if m.name.startswith("R_D*")]
    finite = _joint(["inconclusive" if not decidable(m)
                     else "agree" if m.high <= limit else "disagree" if m.low > limit else "inconclusive"
                     for m in stars])
    parts = f"up to 4 epochs: {four}; at the most epochs (repetition should hurt): {beyond}; R_D* finite: {finite}"
    if "disagree" in (four, beyond, finite):
        return "disagree", parts
    if four == beyond == finite == "agree":
        return "agree", "at every size 4 epochs within the tolerance, the most epochs clearly worse, and R_D* finite"
    return "inconclusive", f"{parts} (intervals missing or straddling)"


register(Study(
    name="repetition", version=4,
    changes="U a quarter of 20 tokens per non-embedding parameter, so 4 epochs run at about compute-optimal D (v3: "
            "3.5 tokens per parameter), for two narrow models on the 512-token BPE (cpu N_nv 14k and 56k, d_model "
            "24 and 48 in 2 layers; v3 one, 111k on the 4096-token BPE), each at an LR falling as 1/d_model; the rule "
            "unchanged, applied at each size (agree when every size agrees, disagree when any does).",
    paper="Muennighoff et al. 2023, Scaling Data-Constrained Language Models",
    claim="Training up to ~4 epochs on repeated data is almost as good as unique data at the same "
          "token count; by 16 epochs the repeated tokens are worth clearly less; the data-constrained "
          "law fits with a finite R_D* (15.4 in the paper).",
    sweeps=sweeps, analyse=analyse, verdict=verdict,
    caveat="The paper's models are far from memorising U; small models on small U are, so repetition may hurt "
           "earlier (or, on a simple language, not at all). Two sizes a factor 4 apart, one untuned LR each, "
           "and R_N* untested (no model larger than its U calls for).",
))
