"""IsoFLOP profiles: N_opt ∝ C^a with a ≈ 0.5 by Approaches 1, 2 and 3 (Hoffmann et al. 2022)."""

from __future__ import annotations

from typing import Any

import numpy as np

from testbed.study.base import Analysis, Context, Measurement, Study, figure, register, tuned
from testbed.study.recipes import BATCH, base, ladder_corpus

KAPLAN_A = 0.73
CHINCHILLA_TOKENS_PER_PARAMETER = 20  # Hoffmann et al. 2022, Table 3: D_opt / N_opt ≈ 20
# At cpu budgets Chinchilla's ~20 tokens per parameter puts N_opt near 50k-100k parameters, fewer
# than a 4096-token embedding alone holds at d_model 32 (v2's grid had its minimum below the
# smallest size at every budget): the cpu size reads the 512-token rung of the vocabulary ladder.
CPU_VOCAB = 512


def budgets(size: str) -> list[float]:
    return {"tiny": [1e8, 3e8, 1e9], "cpu": [2.5e11, 5e11, 1e12], "gpu": [3e16, 1e17, 3e17]}[size]


def widths(size: str) -> list[int]:
    return {"tiny": [8, 16, 32], "cpu": [16, 24, 32, 48, 64], "gpu": [256, 384, 512, 768, 1024]}[size]


def lrs(size: str) -> list[float]:
    """Each model size at its own tuned LR from this grid, per budget (tiny: one LR; the choice
    among several is exercised by the other studies' tiny runs)."""
    return {"tiny": [1e-2], "cpu": [4e-3, 1.2e-2], "gpu": [1e-3, 3e-3]}[size]


def sweeps(size: str) -> list[dict[str, Any]]:
    tree = base(size)
    if size == "cpu":
        tree["data"]["path"] = ladder_corpus(size, CPU_VOCAB)
        tree["model"]["vocab_size"] = CPU_VOCAB
    tree["train"]["global_batch_tokens"] = BATCH[size] // 2
    batch = BATCH[size] // 2
    # The budget is a label; the run length follows from it: D = C / FLOPs per token.
    return [{"name": "chinchilla", "base": tree,
             "grid": {"labels.budget": budgets(size), "model.d_model": widths(size), "optim.lr": lrs(size)},
             "derived": {"train.tokens": f"max(1, round(labels.budget / flops_per_token / {batch})) * {batch}"},
             "labels": ["labels.budget", "model.d_model", "optim.lr"]}]


def _approach(frame, number: int) -> tuple[float, float] | None:
    """(a, b) by Approach 1 (the lowest-loss run per budget) or 2 (IsoFLOP parabolas); None when
    the approach finds fewer than three budgets' minima."""
    import warnings

    from testbed.fit.approaches import approach1, approach2

    with warnings.catch_warnings():  # resampled budgets repeat sizes: ill-conditioned parabolas
        warnings.simplefilter("ignore")
        if number == 1:
            result = approach1(frame, n_bins=frame["label_budget"].nunique())
        else:
            result = approach2(frame, min_points=3)
    return None if result is None else (float(result["a"]), float(result["b"]))


def _resampled(frame, number: int, draws: int = 400) -> tuple[Measurement, Measurement]:
    """a and b of one approach with percentile intervals from resampling runs within budgets."""
    found = _approach(frame, number)
    rng = np.random.default_rng(0)
    groups = [np.flatnonzero(frame["label_budget"].to_numpy() == budget) for budget in sorted(frame["label_budget"].unique())]
    values = []
    for _ in range(draws):
        picked = np.concatenate([members[rng.integers(0, len(members), len(members))] for members in groups])
        value = _approach(frame.iloc[picked], number)
        if value is not None and all(np.isfinite(value)):
            values.append(value)
    name = {1: "Approach 1 (lowest-loss run per budget)", 2: "Approach 2 (IsoFLOP parabolas)"}[number]
    how = f"bootstrap over runs within each budget ({len(values)} of {draws} replicates usable)"
    if found is None or len(values) < draws // 4:
        how = ("fewer than three budgets have a minimum inside the sampled sizes"
               if found is None else f"only {len(values)} of {draws} replicates usable: no interval")
        a = Measurement(f"a in N_opt ∝ C^a, {name}", found[0] if found else None, None, None, "", how)
        b = Measurement(f"b in D_opt ∝ C^b, {name}", found[1] if found else None, None, None, "", how)
        return a, b
    low, high = np.percentile(np.array(values), [2.5, 97.5], axis=0)
    return (Measurement(f"a in N_opt ∝ C^a, {name}", found[0], float(low[0]), float(high[0]), "", how),
            Measurement(f"b in D_opt ∝ C^b, {name}", found[1], float(low[1]), float(high[1]), "", how))


def _approach3(frame) -> tuple[Measurement, Measurement, dict[str, float]]:
    """a = beta / (alpha + beta) of L = E + A/N^alpha + B/D^beta fitted to every tuned run
    (testbed's fitter), with its bootstrap over runs."""
    from testbed.errors import TestbedError
    from testbed.fit.analysis import analyse as fit_analyse
    from testbed.fit.options import FitOptions

    name = "Approach 3 (fitted L(N, D))"
    try:
        fitted = fit_analyse(frame[["run_id", "N", "D", "C", "loss"]],
                             FitOptions(law="chinchilla", bootstrap=200, allocation="yes", skip_fraction=0.0))
    except TestbedError as err:
        missing = Measurement(f"a in N_opt ∝ C^a, {name}", None, how=f"the fit failed: {err}")
        return missing, Measurement(f"b in D_opt ∝ C^b, {name}", None, how=missing.how), {}
    summary = fitted.summary
    intervals = summary.get("intervals") or {}
    how = "bootstrap over runs (200 refits)"
    if fitted.result.at_bound:
        how += f"; at a bound: {', '.join(fitted.result.at_bound)}"
    out = []
    for key, symbol, what in (("a", "a", "N_opt ∝ C^a"), ("b", "b", "D_opt ∝ C^b")):
        band = intervals.get(key) or {}
        out.append(Measurement(f"{symbol} in {what}, {name}", float(summary["derived"][key]),
                               band.get("low"), band.get("high"), "", how))
    return out[0], out[1], {k: float(v) for k, v in fitted.result.law.public(fitted.result.theta).items()}


def analyse(ctx: Context) -> Analysis:
    points = ctx.finals("chinchilla")
    frame = tuned(points, ["label_budget", "width"])
    frame = frame[["run_id", "N", "D", "C", "loss", "label_budget", "peak_lr"]].dropna().reset_index(drop=True)
    a2, b2 = _resampled(frame, 2)
    a1, b1 = _resampled(frame, 1)
    a3, b3, law = _approach3(frame)
    # The headline is Approach 2 (the IsoFLOP design's own), else the first approach that measured a.
    headline, *others = sorted([a2, a1, a3], key=lambda m: m.value is None)
    rows = [{"budget": float(bud), "N": float(r["N"]), "D": float(r["D"]), "C": float(r["C"]),
             "lr": float(r["peak_lr"]), "loss": float(r["loss"])}
            for bud, g in frame.groupby("label_budget") for _, r in g.sort_values("N").iterrows()]
    tables = {"isoflop points": rows}
    minima = _parabola_minima(frame)
    if minima:
        tables["Approach 2 minima"] = minima
    notes = ["agree: every approach's interval of a holds 0.5 and excludes Kaplan's 0.73; disagree: "
             "any excludes 0.5", "each (budget, size) at the better LR of its grid (the lr column)"]
    if law:
        notes.append("Approach 3's fitted law: " + ", ".join(f"{k} = {v:.4g}" for k, v in law.items()))
    return Analysis(headline, [*others, b2, b1, b3], tables, [_plot(ctx, rows)], notes)


def _parabola_minima(frame) -> list[dict]:
    """Each budget's IsoFLOP vertex beside Chinchilla's ~20 tokens per parameter (C = 6·N·20·N),
    the paper's other headline number, which a slope alone does not show."""
    from testbed.fit.approaches import approach2

    result = approach2(frame, min_points=3)
    if result is None:
        return []
    return [{"C": m["C"], "N_opt": m["N_opt"], "D_opt": m["D_opt"], "tokens per parameter": m["D_opt"] / m["N_opt"],
             "N at 20 tokens per parameter": (m["C"] / (6 * CHINCHILLA_TOKENS_PER_PARAMETER)) ** 0.5}
            for m in result["minima"]]


def _plot(ctx: Context, rows: list[dict]) -> str:
    with figure(ctx.out / "isoflop.png", "parameters N") as ax:
        for budget in sorted({r["budget"] for r in rows}):
            pts = [r for r in rows if r["budget"] == budget]
            ax.plot([r["N"] for r in pts], [r["loss"] for r in pts], "o-", label=f"C = {budget:.0e}")
    return "isoflop.png"


def verdict(analysis: Analysis) -> tuple[str, str]:
    from testbed.study.base import combine

    approaches = [analysis.headline, *[m for m in analysis.more if m.name.startswith("a in")]]
    parts = []
    for m in approaches:
        if m.value is None or m.low is None or m.high is None:
            parts.append("inconclusive")
        elif not m.low <= 0.5 <= m.high:
            parts.append("disagree")
        else:
            parts.append("inconclusive" if m.low <= KAPLAN_A <= m.high else "agree")
    named = ", ".join(f"{m.name.split(', ')[1].split(' (')[0]}: {p}" for m, p in zip(approaches, parts))
    return combine(parts, f"an interval of a excludes 0.5 ({named})",
                   f"every approach's interval holds 0.5 and excludes 0.73 ({named})",
                   f"some interval is missing or holds both 0.5 and 0.73 ({named})")


register(Study(
    name="chinchilla", version=3,
    paper="Hoffmann et al. 2022, Training Compute-Optimal Large Language Models (Approaches 1-3); "
          "Besiroglu et al. 2024, Chinchilla Scaling: A replication attempt",
    claim="Approaches 1, 2 and 3 agree: the compute-optimal model grows as N_opt ∝ C^a with a ≈ 0.5 "
          "(parameters and tokens scaled equally), not Kaplan's 0.73.",
    sweeps=sweeps, analyse=analyse, verdict=verdict,
    caveat="Budgets spanning a factor of four or ten give a short lever arm; Approach 1 on final "
           "points can only pick a sampled size; embedding parameters weigh heavily in small models; "
           "each LR is the better of two.",
))
