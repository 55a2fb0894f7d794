"""Peri-LN vs Pre-LN (Kim et al. 2025): the template for an ablation of your own.

Copy this file, change `KEY, BASELINE, VARIANT` to your registered part (docs/ablations.md) and
the claim, and run it with `testbed study run NAME --import your_module`. Both arms train a
ladder of four model sizes, each size at a compute budget of its own and each arm at its own
tuned LR; the report gives the variant's compute multiplier (how much more compute the baseline
needs for the same loss) with a bootstrap interval, and the budgets where the frontiers cross.
"""

from __future__ import annotations

from typing import Any

from testbed.study.base import Analysis, Context, Study, compute_multiplier, figure, register, relative_gap, tuned
from testbed.study.recipes import BATCH, base, tiny_text

KEY, BASELINE, VARIANT = "model.norm_placement", "pre", "peri"

LADDER = {  # (d_model, n_layers, training FLOPs)
    "tiny": [(16, 2, 5e8), (24, 2, 1e9), (32, 2, 2e9), (48, 2, 4e9)],
    "cpu": [(32, 4, 4e11), (48, 4, 1e12), (64, 4, 2.5e12), (96, 4, 6e12)],
    "gpu": [(256, 8, 3e16), (384, 8, 1e17), (512, 8, 3e17), (768, 8, 1e18)],
}
LRS = {"tiny": [3e-3, 1e-2], "cpu": [4e-3, 1.2e-2], "gpu": [1e-3, 3e-3]}


def sweeps(size: str) -> list[dict[str, Any]]:
    ladder, batch = LADDER[size], BATCH[size]
    tree = tiny_text(base(size)) if size == "tiny" else base(size)
    return [{"name": "ablation", "base": tree,
             "grid": {KEY: [BASELINE, VARIANT], "optim.lr": LRS[size]},
             "zip": {"model.d_model": [d for d, _, _ in ladder], "model.n_layers": [n for _, n, _ in ladder],
                     "labels.budget": [c for _, _, c in ladder]},
             "derived": {"model.n_heads": 2 if size == "tiny" else "max(1, d_model // 32)",
                         "train.tokens": f"max(4, round(labels.budget / flops_per_token / {batch})) * {batch}"},
             "labels": [KEY, "optim.lr", "labels.budget", "model.d_model"]}]


def analyse(ctx: Context) -> Analysis:
    finals = ctx.finals("ablation")
    arm = "label_" + KEY.rsplit(".", 1)[1]
    best = tuned(finals, [arm, "label_budget"])  # each arm at each budget at its tuned LR
    frontier = {name: {float(r["C"]): float(r["loss"]) for _, r in best.loc[best[arm] == name].iterrows()}
                for name in (BASELINE, VARIANT)}
    multiplier, rows = compute_multiplier(frontier[BASELINE], frontier[VARIANT])
    multiplier.name = f"{VARIANT} compute multiplier over {BASELINE}, " + multiplier.name.split(", ")[-1]
    more = []
    for budget, g in best.groupby("label_budget"):
        gap = relative_gap(g.loc[g[arm] == VARIANT, "loss"].tolist(), g.loc[g[arm] == BASELINE, "loss"].tolist())
        gap.name = f"relative loss gap {VARIANT} − {BASELINE} at C = {budget:.3g}"
        more.append(gap)
    for row, (_, g) in zip(rows, best.groupby("label_budget")):
        row["d_model"] = int(g["width"].iloc[0])
        row.update({f"{name}_lr": float(g.loc[g[arm] == name, "peak_lr"].iloc[0]) for name in (BASELINE, VARIANT)})
    return Analysis(multiplier, more, {"frontiers": rows, "spikes": _spikes(finals, arm)}, [_plot(ctx, rows)],
                    [f"agree: the multiplier's interval lies above 1 ({VARIANT} needs less compute)"])


def _spikes(finals, arm: str) -> list[dict[str, Any]]:
    """Loss spikes the trainer recorded (train/monitor.py), per arm over all its runs: the
    stability half of the claim."""
    from testbed.rundir import RunDir

    counts: dict[str, int] = {}
    for _, run in finals.iterrows():
        rows = [r for r in RunDir(run["run_dir"]).metrics() if "spikes" in r]
        counts[run[arm]] = counts.get(run[arm], 0) + int(rows[-1]["spikes"] if rows else 0)
    return [{"arm": name, "loss_spikes": n} for name, n in sorted(counts.items())]


def _plot(ctx: Context, rows: list[dict]) -> str:
    with figure(ctx.out / "ablation.png", "training FLOPs C") as ax:
        ax.plot([r["C"] for r in rows], [r["baseline_loss"] for r in rows], "o-", label=f"{BASELINE} (tuned LR)")
        ax.plot([r["C"] for r in rows], [r["variant_loss"] for r in rows], "s-", label=f"{VARIANT} (tuned LR)")
        ax.set_yscale("log")
    return "ablation.png"


def verdict(analysis: Analysis) -> tuple[str, str]:
    m = analysis.headline
    if m.low is None or m.high is None:
        return "inconclusive", "no interval for the multiplier"
    if m.low > 1:
        return "agree", f"{VARIANT} needs less compute across the whole interval"
    if m.high < 1:
        return "disagree", f"{VARIANT} needs more compute across the whole interval"
    return "inconclusive", "the multiplier's interval holds 1"


register(Study(
    name="ablation", version=2,
    paper="Kim et al. 2025, Peri-LN: Revisiting Layer Normalization in the Transformer Architecture",
    claim="Normalising each sublayer's input and output (Peri-LN) reaches a lower loss than Pre-LN at "
          "equal compute (a compute multiplier above 1) and trains more stably.",
    sweeps=sweeps, analyse=analyse, verdict=verdict,
    caveat="The paper's gains come from stability at scale and high LRs; shallow small models rarely "
           "show the hidden-state growth Peri-LN prevents, and two LRs per arm is a coarse tuning.",
))
