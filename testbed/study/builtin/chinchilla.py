"""IsoFLOP profiles: N_opt ∝ C^a with a ≈ 0.5 (Hoffmann et al. 2022, Approach 2)."""

from __future__ import annotations

from typing import Any

import numpy as np

from testbed.study.base import Analysis, Context, Measurement, Study, figure, register
from testbed.study.recipes import BATCH, base

KAPLAN_A = 0.73


def budgets(size: str) -> list[float]:
    return {"tiny": [1e8, 3e8, 1e9], "cpu": [1e12, 2e12, 4e12], "gpu": [3e16, 1e17, 3e17]}[size]


def widths(size: str) -> list[int]:
    return {"tiny": [8, 16, 32], "cpu": [32, 48, 64, 96, 128], "gpu": [256, 384, 512, 768, 1024]}[size]


def sweeps(size: str) -> list[dict[str, Any]]:
    tree = base(size)
    tree["train"]["global_batch_tokens"] = BATCH[size] // 2
    batch = BATCH[size] // 2
    # The budget is a label; the run length follows from it: D = C / FLOPs per token.
    return [{"name": "chinchilla", "base": tree,
             "grid": {"labels.budget": budgets(size), "model.d_model": widths(size)},
             "derived": {"train.tokens": f"max(1, round(labels.budget / flops_per_token / {batch})) * {batch}"},
             "labels": ["labels.budget", "model.d_model"]}]


def _a(frame) -> float | None:
    import warnings

    from testbed.fit.approaches import approach2

    with warnings.catch_warnings():  # resampled budgets repeat sizes: ill-conditioned parabolas
        warnings.simplefilter("ignore")
        result = approach2(frame, min_points=3)
    return None if result is None else float(result["a"])


def analyse(ctx: Context) -> Analysis:
    import pandas as pd

    finals = ctx.finals("chinchilla")
    frame = finals[["run_id", "N", "C", "loss", "label_budget"]].dropna().reset_index(drop=True)
    a = _a(frame)
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(400):  # resample runs within each budget
        parts = [g.iloc[rng.integers(0, len(g), len(g))] for _, g in frame.groupby("label_budget")]
        value = _a(pd.concat(parts))
        if value is not None and np.isfinite(value):
            draws.append(value)
    low = high = None
    how = "IsoFLOP parabolas (testbed.fit.approaches.approach2); bootstrap over runs within each budget"
    if len(draws) >= 100:
        low, high = float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))
        how += f" ({len(draws)} of 400 replicates had a minimum inside every budget)"
    else:
        how += f": only {len(draws)} of 400 replicates had a minimum inside every budget, no interval"
    if a is None:  # fall back to the best sampled size per budget: a grid-limited estimate
        best = frame.loc[frame.groupby("label_budget")["loss"].idxmin()]
        a = float(np.polyfit(np.log(best["C"].astype(float)), np.log(best["N"].astype(float)), 1)[0])
        low = high = None
        how = ("fewer than 3 budgets have their parabola's minimum inside the sampled sizes: slope of "
               "the lowest-loss sampled N per budget, no interval (limited by the size grid)")
    headline = Measurement("a in N_opt ∝ C^a", a, low, high, "", how)
    rows = [{"budget": float(b), "N": float(r["N"]), "C": float(r["C"]), "loss": float(r["loss"])}
            for b, g in frame.groupby("label_budget") for _, r in g.sort_values("N").iterrows()]
    return Analysis(headline, [], {"isoflop points": rows}, [_plot(ctx, rows)],
                    ["agree: the interval holds 0.5 and excludes Kaplan's 0.73; disagree: it excludes 0.5"])


def _plot(ctx: Context, rows: list[dict]) -> str:
    with figure(ctx.out / "isoflop.png", "parameters N") as ax:
        for budget in sorted({r["budget"] for r in rows}):
            pts = [r for r in rows if r["budget"] == budget]
            ax.plot([r["N"] for r in pts], [r["loss"] for r in pts], "o-", label=f"C = {budget:.0e}")
    return "isoflop.png"


def verdict(analysis: Analysis) -> tuple[str, str]:
    m = analysis.headline
    if m.value is None or m.low is None or m.high is None:
        return "inconclusive", "no interval for a (too few IsoFLOP minima inside the sampled sizes)"
    if m.low <= 0.5 <= m.high and not m.low <= KAPLAN_A <= m.high:
        return "agree", "the interval holds 0.5 and excludes 0.73"
    if not m.low <= 0.5 <= m.high:
        return "disagree", "the interval excludes 0.5"
    return "inconclusive", "the interval holds both 0.5 and 0.73"


register(Study(
    name="chinchilla", version=1,
    paper="Hoffmann et al. 2022, Training Compute-Optimal Large Language Models (Approach 2)",
    claim="At a fixed compute budget loss is a parabola in log N; its minimum grows as N_opt ∝ C^a "
          "with a ≈ 0.5 (parameters and tokens scaled equally), not Kaplan's 0.73.",
    sweeps=sweeps, analyse=analyse, verdict=verdict,
    caveat="Three budgets over one decade give a short lever arm; embedding parameters weigh heavily "
           "in small models, and one LR for every size biases the small or the large end.",
))
