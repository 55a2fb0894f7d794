"""Larger models deserve larger vocabularies (Tao et al. 2024): IsoFLOP profiles over the vocabulary.

For each model size (non-vocabulary parameters N_nv) at its own compute budget, the same text is
tokenised at five vocabulary sizes from one nested BPE ladder (`data prepare --nested-in`) and
the runs are compared in bits per byte, the unit that does not depend on the tokenizer. The
vocabulary with the lowest bits per byte, from a parabola in log V, is V_opt for that size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from testbed.study.base import Analysis, Context, Measurement, Study, figure, register
from testbed.study.recipes import BATCH, VOCAB_LADDER, base, ladder_corpus, tiny_text

# Tao et al.'s Approach 2 on their runs: N_v,opt ∝ N_nv^0.8354 (sail-sg/scaling-with-vocab).
PUBLISHED_GAMMA = 0.8354
MODELS = {"tiny": [(16, 2), (32, 2)], "cpu": [(32, 4), (64, 4), (128, 4)],
          "gpu": [(256, 8), (512, 8), (1024, 8)]}  # (d_model, n_layers)
BUDGETS = {"tiny": [1e9, 3e9], "cpu": [8e11, 2.4e12, 7.2e12], "gpu": [3e16, 1.2e17, 4.8e17]}


def sweeps(size: str) -> list[dict[str, Any]]:
    tree = tiny_text(base(size)) if size == "tiny" else base(size)  # real text at every size
    batch = BATCH[size]
    models = MODELS[size]
    specs = []
    # One sweep per vocabulary: its corpus and vocab_size stated together, so `study plan` can
    # cost the runs before the corpora are prepared.
    for vocab in VOCAB_LADDER[size]:
        path = ladder_corpus(size, vocab)
        tree = {**tree, "data": {**tree["data"], "path": path}, "model": {**tree["model"], "vocab_size": vocab}}
        specs.append({"name": f"vocab-{vocab}", "base": tree,
                      "zip": {"model.d_model": [d for d, _ in models], "model.n_layers": [n for _, n in models],
                              "labels.budget": BUDGETS[size]},
                      "derived": {"model.n_heads": "max(1, d_model // 32)",
                                  "train.tokens": f"max(4, round(labels.budget / flops_per_token / {batch})) * {batch}"},
                      "labels": ["labels.budget", "model.d_model"]})
    return specs


def v_opt(vocab, bpb) -> tuple[float | None, bool]:
    """(V at the minimum of a parabola in log V through the points, whether it is inside the
    sampled range); the lowest sampled V when the parabola opens downward."""
    x, y = np.log(np.asarray(vocab, float)), np.asarray(bpb, float)
    if len(set(x)) < 3:
        return None, False
    a, b, _ = np.polyfit(x, y, 2)
    if a <= 0:
        best = float(np.exp(x[np.argmin(y)]))
        return best, False
    at = -b / (2 * a)
    inside = bool(x.min() <= at <= x.max())
    return float(np.exp(np.clip(at, x.min(), x.max()))), inside


def _slope(frame) -> tuple[float | None, float | None, list[dict[str, Any]]]:
    """(b in V_opt ∝ N_nv^b, γ in V_opt·d ∝ N_nv^γ, the per-size optima)."""
    rows = []
    for n_nv, g in frame.groupby("N_non_embedding"):
        best, inside = v_opt(g["vocab"], g["bpb"])
        if best is None:
            return None, None, rows
        d = float(g["width"].iloc[0])
        rows.append({"N_nv": float(n_nv), "d_model": int(d), "V_opt": best, "inside": inside,
                     "N_v_opt": best * d})
    if len(rows) < 2:
        return None, None, rows
    n = np.log([r["N_nv"] for r in rows])
    slope = float(np.polyfit(n, np.log([r["V_opt"] for r in rows]), 1)[0])
    gamma = float(np.polyfit(n, np.log([r["N_v_opt"] for r in rows]), 1)[0])
    return slope, gamma, rows


def analyse(ctx: Context) -> Analysis:
    import pandas as pd

    finals = ctx.finals()
    frame = finals[["run_id", "N_non_embedding", "width", "vocab", "bpb", "C"]].dropna().reset_index(drop=True)
    slope, gamma, rows = _slope(frame)
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(400):  # resample the vocabularies within each model size
        parts = [g.iloc[rng.integers(0, len(g), len(g))] for _, g in frame.groupby("N_non_embedding")]
        value, value_gamma, _ = _slope(pd.concat(parts))
        if value is not None and np.isfinite(value) and np.isfinite(value_gamma):
            draws.append((value, value_gamma))
    low = high = (None, None)
    how = "parabola in log V per model size; bootstrap over the vocabularies within each size"
    if len(draws) >= 100:
        low, high = (tuple(float(x) for x in np.percentile(np.array(draws), q, axis=0)) for q in (2.5, 97.5))
    headline = Measurement("b in V_opt ∝ N_nv^b", slope, low[0], high[0], "", how)
    more = []
    if gamma is not None:
        more.append(Measurement(f"γ in N_v,opt = V_opt·d ∝ N_nv^γ (paper: {PUBLISHED_GAMMA})", gamma,
                                low[1], high[1], "", how + "; the paper's γ < 1: vocabulary parameters "
                                "grow slower than non-vocabulary ones"))
    points = [{"N_nv": float(r["N_non_embedding"]), "vocab": int(r["vocab"]), "bpb": float(r["bpb"]),
               "C": float(r["C"])} for _, r in frame.sort_values(["N_non_embedding", "vocab"]).iterrows()]
    notes = ["agree: the interval of b lies above 0 (V_opt grows with the model); disagree: below 0"]
    if more and more[0].low is not None:
        holds = more[0].low <= PUBLISHED_GAMMA <= more[0].high
        notes.append(f"the paper's trend, N_v,opt ∝ N_nv^{PUBLISHED_GAMMA} (Approach 2 on its 1,200 runs), "
                     f"{'lies inside' if holds else 'lies outside'} the interval of γ")
    if any(not r["inside"] for r in rows):
        notes.append("some V_opt lies at the edge of the sampled vocabularies: the trend there is a bound")
    return Analysis(headline, more, {"optimal vocabulary": rows, "points": points}, [_plot(ctx, points)], notes)


def _plot(ctx: Context, points: list[dict]) -> str:
    with figure(ctx.out / "vocab.png", "vocabulary size V", "validation bits per byte", log_base=2) as ax:
        for n_nv in sorted({p["N_nv"] for p in points}):
            pts = [p for p in points if p["N_nv"] == n_nv]
            ax.plot([p["vocab"] for p in pts], [p["bpb"] for p in pts], "o-", label=f"N_nv = {n_nv:.3g}")
    return "vocab.png"


def verdict(analysis: Analysis) -> tuple[str, str]:
    m = analysis.headline
    if m.value is None or m.low is None or m.high is None:
        return "inconclusive", "no interval for b (too few sizes or vocabularies)"
    if m.low > 0:
        return "agree", "V_opt grows with N_nv across the whole interval"
    if m.high < 0:
        return "disagree", "V_opt shrinks with N_nv across the whole interval"
    return "inconclusive", "the interval of b holds 0"


register(Study(
    name="vocab", version=1,
    paper="Tao et al. 2024, Scaling Laws with Vocabulary: Larger Models Deserve Larger Vocabularies",
    claim="At a compute budget matched to the model, the vocabulary giving the lowest loss per byte "
          "grows with the model's non-vocabulary parameters (V_opt ∝ N_nv^b with b > 0), with "
          "vocabulary parameters growing more slowly than non-vocabulary ones.",
    sweeps=sweeps, analyse=analyse, verdict=verdict,
    caveat="Three small models over one decade of N_nv, one seed per point, code rather than prose "
           "(whose token statistics differ), and embeddings that dominate the parameters of the "
           "smallest models.",
))
