"""Peri-LN vs Pre-LN (Kim et al. 2025): the template for an ablation of your own.

Copy this file, change `ARMS` to your registered part (docs/ablations.md) and the claim, and run
it with `testbed study run NAME --import your_module`.
"""

from __future__ import annotations

from typing import Any

from testbed.study.base import Analysis, Context, Study, register, relative_gap
from testbed.study.recipes import BATCH, base, seeds

KEY, BASELINE, VARIANT = "model.norm_placement", "pre", "peri"


def sweeps(size: str) -> list[dict[str, Any]]:
    tree = base(size)
    tree["train"]["tokens"] = {"tiny": 32, "cpu": 1000, "gpu": 20000}[size] * BATCH[size]
    return [{"name": "ablation", "base": tree,
             "grid": {KEY: [BASELINE, VARIANT], "train.seed": seeds(size)},
             "labels": [KEY, "train.seed"]}]


def analyse(ctx: Context) -> Analysis:
    finals = ctx.finals("ablation")
    column = "label_" + KEY.rsplit(".", 1)[1]
    a = finals.loc[finals[column] == VARIANT, "loss"].tolist()
    b = finals.loc[finals[column] == BASELINE, "loss"].tolist()
    gap = relative_gap(a, b)
    gap.name = f"relative loss gap {VARIANT} − {BASELINE}"
    rows = [{"arm": arm, "loss": sum(x) / len(x), "seeds": len(x)} for arm, x in ((BASELINE, b), (VARIANT, a))]
    return Analysis(gap, [], {"arms": rows}, [], ["agree: the whole interval is below 0 (the variant is better)"])


def verdict(analysis: Analysis) -> tuple[str, str]:
    m = analysis.headline
    if m.low is None or m.high is None:
        return "inconclusive", "one seed per arm: no interval"
    if m.high < 0:
        return "agree", f"{VARIANT} is lower across the whole interval"
    if m.low > 0:
        return "disagree", f"{VARIANT} is higher across the whole interval"
    return "inconclusive", "the interval holds 0"


register(Study(
    name="ablation", version=1,
    paper="Kim et al. 2025, Peri-LN: Revisiting Layer Normalization in the Transformer Architecture",
    claim="Normalising each sublayer's input and output (Peri-LN) reaches a lower loss than Pre-LN at the same budget.",
    sweeps=sweeps, analyse=analyse, verdict=verdict,
    caveat="The paper's gains come from stability at scale and high LRs; shallow small models rarely "
           "show the hidden-state growth Peri-LN prevents.",
))
