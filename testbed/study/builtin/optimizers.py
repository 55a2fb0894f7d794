"""Muon against AdamW across a ladder of sizes, each tuned at each size (Wen et al. 2025).

Both optimisers train four model sizes, each size at a compute budget of its own (5-7
tokens per parameter at cpu size), each over its own LR grid (Muon's match_rms_adamw rule lets
AdamW's weight decay carry over, docs/optimizers.md) and with seeds that vary the data
order too; each optimiser takes its own best LR at each size. The report gives Muon's compute
multiplier over AdamW, overall and per size, with intervals (testbed.study.arms).
"""

from __future__ import annotations

from typing import Any

from testbed.study.arms import Arms, compare_arms, ladder_brackets, ladder_sweeps
from testbed.study.base import Analysis, Context, Study, at_most, combine, decidable, register
from testbed.study.recipes import BATCH, seeds, small_vocab_base

ARMS = Arms("optim.name", "adamw", "muon")
CLAIM_MAX = 1.4  # Wen et al.: at most about 1.4x when both are tuned, falling with scale

LADDER = {  # (d_model, n_layers, training FLOPs): 5-7 tokens per parameter at cpu size
    "tiny": [(16, 2, 5e8), (24, 2, 1e9), (32, 2, 2e9), (48, 2, 4e9)],
    "cpu": [(16, 4, 4e10), (24, 4, 1.3e11), (32, 4, 3.2e11), (48, 4, 1.2e12)],
    "gpu": [(256, 8, 1e16), (384, 8, 3e16), (512, 8, 8e16), (768, 8, 2e17)],
}
# Each optimiser's own grid, four points a factor 3 apart at cpu size, Muon's a step above
# AdamW's: on v1's shared three points (4e-3 to 3.6e-2) AdamW's optimum fell to the lowest LR at
# the largest size and Muon's to the highest at three sizes. Bracketed beyond cpu's tiny.
LRS = {"tiny": {"adamw": [3e-3, 1e-2], "muon": [3e-3, 1e-2]},
       "cpu": {"adamw": [1.3e-3, 4e-3, 1.2e-2, 3.6e-2], "muon": [4e-3, 1.2e-2, 3.6e-2, 0.108]},
       "gpu": {"adamw": [3e-4, 1e-3, 3e-3, 1e-2], "muon": [1e-3, 3e-3, 1e-2, 3e-2]}}


def sweeps(size: str) -> list[dict[str, Any]]:
    tree = small_vocab_base(size, text_at_tiny=True)
    heads: int | str = 2 if size == "tiny" else "max(1, d_model // 16)" if size == "cpu" else "max(1, d_model // 64)"
    return ladder_sweeps("optimizers", tree, ARMS, LADDER[size], LRS[size], BATCH[size], seeds(size), heads)


def analyse(ctx: Context) -> Analysis:
    analysis = compare_arms(ctx, "optimizers", ARMS)
    analysis.notes.insert(0, f"agree: the multiplier's interval lies at or below {CLAIM_MAX} and the offset's trend "
                             "is positive (Muon's lead shrinks with compute)")
    return analysis


def verdict(analysis: Analysis) -> tuple[str, str]:
    trend = analysis.more[0]
    falls = ("inconclusive" if not decidable(trend) else "agree" if trend.low > 0
             else "disagree" if trend.high < 0 else "inconclusive")
    return combine([at_most(analysis.headline, CLAIM_MAX), falls],
                   disagree=f"Muon's multiplier lies above {CLAIM_MAX}, or its lead grows with compute",
                   agree=f"Muon's multiplier is at most {CLAIM_MAX} and its lead shrinks with compute",
                   inconclusive="an interval straddles its threshold, or rests on an LR at its grid's edge")


register(Study(
    name="optimizers", version=3,
    changes="each optimiser's LR grid extended past an edge, a factor 3 at a time (at most two rounds), where a "
            "size's optimum lands there: v2 left the smallest size at the top of both grids; claim and rule unchanged.",
    brackets=lambda size: {} if size == "tiny" else ladder_brackets("optimizers", ARMS),
    paper="Wen et al. 2025, Fantastic Pretraining Optimizers and Where to Find Them",
    claim=f"With each optimiser tuned at each size, Muon's speed-up over AdamW is at most about "
          f"{CLAIM_MAX}x in compute and falls as models grow (Moonlight, Liu et al. 2025, report about 2x).",
    sweeps=sweeps, analyse=analyse, verdict=verdict,
    caveat="Small models at 5-7 tokens per parameter (the paper trains 1-8x Chinchilla); one weight "
           "decay (0.1) for both; the per-size multiplier reads compute off AdamW's frontier across sizes "
           "rather than off longer runs at one size; Newton-Schulz FLOPs are not counted in C.",
))
