"""Larger models deserve larger vocabularies (Tao et al. 2024): IsoFLOP profiles over the vocabulary.

For each model size (non-vocabulary parameters N_nv) at its own compute budget, the same text is
tokenised at five vocabulary sizes from one nested BPE ladder (`data prepare --nested-in`) and
the runs are compared in bits per byte, the unit that does not depend on the tokenizer. The
vocabulary with the lowest bits per byte, from a parabola in log V, is V_opt for that size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from testbed.stats.curves import parametric_bootstrap, percentile
from testbed.study.base import Analysis, Context, Measurement, Study, above, figure, register
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
    rows: list[dict[str, Any]] = []
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
    finals = ctx.finals()
    frame = finals[["run_id", "N_non_embedding", "width", "vocab", "bpb", "C"]].dropna()
    frame = frame.sort_values(["N_non_embedding", "vocab"]).reset_index(drop=True)
    slope, gamma, rows = _slope(frame)
    low = high = (None, None)
    how = "parabola in log V per model size; no interval (a parabola failed or too few sizes)"
    caveat = ""
    if slope is not None and gamma is not None:
        (low, high), how, caveat = _interval(frame, rows)
    if any(not r["inside"] for r in rows):
        caveat = "some V_opt lies at the edge of the sampled vocabularies" + (f"; {caveat}" if caveat else "")
    headline = Measurement("b in V_opt ∝ N_nv^b", slope, low[0], high[0], "", how, caveat)
    more = []
    if gamma is not None:
        more.append(Measurement(f"γ in N_v,opt = V_opt·d ∝ N_nv^γ (paper: {PUBLISHED_GAMMA})", gamma,
                                low[1], high[1], "", how + "; the paper's γ < 1: vocabulary parameters "
                                "grow slower than non-vocabulary ones", caveat))
    points = [{"N_nv": float(r["N_non_embedding"]), "vocab": int(r["vocab"]), "bpb": float(r["bpb"]),
               "C": float(r["C"])} for _, r in frame.iterrows()]
    notes = ["agree: the interval of b lies above 0 (V_opt grows with the model); disagree: below 0"]
    if more and more[0].low is not None and more[0].high is not None:
        holds = more[0].low <= PUBLISHED_GAMMA <= more[0].high
        notes.append(f"the paper's trend, N_v,opt ∝ N_nv^{PUBLISHED_GAMMA} (Approach 2 on its 1,200 runs), "
                     f"{'lies inside' if holds else 'lies outside'} the interval of γ")
    return Analysis(headline, more, {"optimal vocabulary": rows, "points": points}, [_plot(ctx, points)], notes)


def _interval(frame, rows: list[dict], draws: int = 400) -> tuple[tuple[tuple, tuple], str, str]:
    """Intervals of (b, γ) by a parametric bootstrap of the parabolas' residuals: the sizes and
    vocabularies stay as they were run; every replicate counts, one whose optimum leaves the
    sampled vocabularies included (counted, and a caveat when it could move an interval's end)."""
    sizes = frame["N_non_embedding"].to_numpy(float)
    log_v, bpb = np.log(frame["vocab"].to_numpy(float)), frame["bpb"].to_numpy(float)
    fitted = np.empty_like(bpb)
    for n_nv in np.unique(sizes):
        at = sizes == n_nv
        fitted[at] = np.polyval(np.polyfit(log_v[at], bpb[at], 2), log_v[at])
    df = len(bpb) - 3 * len(np.unique(sizes))
    if df < 1:
        return ((None, None), (None, None)), "three vocabularies per size: no residual to resample", ""
    sd = float(np.sqrt(np.sum((bpb - fitted) ** 2) / df))
    outside = 0

    def refit(y):
        nonlocal outside
        value, value_gamma, again = _slope(frame.assign(bpb=y))
        if value is None or any(not r["inside"] for r in again):
            outside += 1
        return None if value is None else (value, value_gamma)

    replicates = parametric_bootstrap(refit, fitted, sd, df, draws)
    values = np.array([r if r is not None else (np.nan, np.nan) for r in replicates], float)
    (b_low, b_high), (g_low, g_high) = percentile(values[:, 0]), percentile(values[:, 1])
    share = outside / draws
    how = (f"parabola in log V per model size; parametric bootstrap of the residuals ({draws} replicates, "
           f"{share:.0%} with an optimum at the edge of the sampled vocabularies)")
    caveat = f"the optimum leaves the sampled vocabularies in {share:.0%} of replicates" if share > 0.025 else ""
    return ((b_low, g_low), (b_high, g_high)), how, caveat


def _plot(ctx: Context, points: list[dict]) -> str:
    with figure(ctx.out / "vocab.png", "vocabulary size V", "validation bits per byte", log_base=2) as ax:
        for n_nv in sorted({p["N_nv"] for p in points}):
            pts = [p for p in points if p["N_nv"] == n_nv]
            ax.plot([p["vocab"] for p in pts], [p["bpb"] for p in pts], "o-", label=f"N_nv = {n_nv:.3g}")
    return "vocab.png"


def verdict(analysis: Analysis) -> tuple[str, str]:
    return above(analysis.headline, 0,
                 agree="V_opt grows with N_nv across the whole interval",
                 disagree="V_opt shrinks with N_nv across the whole interval",
                 holds="the interval of b holds 0",
                 undecided="no interval for b (too few sizes or vocabularies), or a caveat on it")


register(Study(
    name="vocab", version=2,
    changes="statistics: intervals from a parametric bootstrap of the parabolas' residuals instead of "
            "resampling vocabularies (which refitted parabolas on duplicates); an optimum at the edge of the "
            "sampled vocabularies is a caveat, not a result.",
    paper="Tao et al. 2024, Scaling Laws with Vocabulary: Larger Models Deserve Larger Vocabularies",
    claim="At a compute budget matched to the model, the vocabulary giving the lowest loss per byte "
          "grows with the model's non-vocabulary parameters (V_opt ∝ N_nv^b with b > 0), with "
          "vocabulary parameters growing more slowly than non-vocabulary ones.",
    sweeps=sweeps, analyse=analyse, verdict=verdict,
    caveat="Three small models over one decade of N_nv, one seed per point, code rather than prose "
           "(whose token statistics differ), and embeddings that dominate the parameters of the "
           "smallest models.",
))
