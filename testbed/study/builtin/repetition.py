"""Repeated data vs unique data at equal tokens (Muennighoff et al. 2023)."""

from __future__ import annotations

from typing import Any

from testbed.study.base import Analysis, Context, Study, figure, register, relative_gap
from testbed.study.recipes import BATCH, base, seeds

TOLERANCE = 0.01  # "negligible": repeated data within 1% of unique data up to 4 epochs


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
    for tokens in sorted(set(ctl["planned_tokens"])):
        a = rep.loc[rep["planned_tokens"] == tokens, "loss"].tolist()
        b = ctl.loc[ctl["planned_tokens"] == tokens, "loss"].tolist()
        e = round(tokens / u)
        gap = relative_gap(a, b)
        gap.name = f"repeated − unique at {e} epochs"
        gaps[e] = gap
        rows.append({"epochs": e, "tokens": int(tokens), "repeated_loss": sum(a) / len(a),
                     "unique_loss": sum(b) / len(b), "gap": gap.value, "gap_low": gap.low, "gap_high": gap.high})
    four = gaps.get(4)
    most = gaps[max(gaps)]
    headline = four if four is not None else most
    more = [g for e, g in sorted(gaps.items()) if g is not headline]
    return Analysis(headline, more, {"repetition": rows}, [_plot(ctx, rows)],
                    [f"U = {u:.3g} unique tokens; tolerance: {TOLERANCE:.0%}"])


def _plot(ctx: Context, rows: list[dict]) -> str:
    with figure(ctx.out / "repetition.png", "epochs over U (tokens D = epochs x U)", log_base=2) as ax:
        ax.plot([r["epochs"] for r in rows], [r["repeated_loss"] for r in rows], "o-", label="U repeated")
        ax.plot([r["epochs"] for r in rows], [r["unique_loss"] for r in rows], "s-", label="unique data")
    return "repetition.png"


def verdict(analysis: Analysis) -> tuple[str, str]:
    from testbed.study.base import at_most

    four = at_most(analysis.headline, TOLERANCE)
    last = analysis.more[-1] if analysis.more else None
    # Diminishing returns: at the most epochs the repeated run is clearly worse.
    beyond = ("inconclusive" if last is None or last.low is None
              else "agree" if last.low > TOLERANCE else "disagree" if last.high <= TOLERANCE else "inconclusive")
    if "disagree" in (four, beyond):
        return "disagree", (f"up to 4 epochs: {four}; at the most epochs (repetition should hurt): {beyond}")
    if four == beyond == "agree":
        return "agree", "4 epochs within the tolerance, and the most epochs clearly worse"
    return "inconclusive", f"up to 4 epochs: {four}; at the most epochs: {beyond} (intervals missing or straddling)"


register(Study(
    name="repetition", version=1,
    paper="Muennighoff et al. 2023, Scaling Data-Constrained Language Models",
    claim="Training up to ~4 epochs on repeated data is almost as good as unique data at the same "
          "token count; by 16 epochs the repeated tokens are worth clearly less.",
    sweeps=sweeps, analyse=analyse, verdict=verdict,
    caveat="The paper's models are far from memorising U; small models on small U are, so "
           "repetition may hurt earlier (or, on a simple language, not at all).",
))
