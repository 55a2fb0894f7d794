"""Peri-LN vs Pre-LN (Kim et al. 2025): the template for an ablation of your own.

Copy this file, change `KEY, BASELINE, VARIANT` to your registered part (docs/ablations.md) and
the claim, and run it with `testbed study run NAME --import your_module`. Both arms train a
ladder of four model sizes, each size at a compute budget of its own and each arm at its own
tuned LR; the report gives the variant's compute multiplier (how much more compute the baseline
needs for the same loss), paired by budget, with its interval (testbed.stats.curves).
"""

from __future__ import annotations

from typing import Any

from testbed.stats import paired_noise, relative_gap
from testbed.stats.curves import compute_multiplier
from testbed.study.base import (
    SIZES,
    Analysis,
    Context,
    Study,
    above,
    choose,
    figure,
    lr_plot,
    measured,
    paired_by_seed,
    register,
)
from testbed.study.recipes import BATCH, base, tiny_text

KEY, BASELINE, VARIANT = "model.norm_placement", "pre", "peri"

LADDER = {  # (d_model, n_layers, training FLOPs)
    "tiny": [(16, 2, 5e8), (24, 2, 1e9), (32, 2, 2e9), (48, 2, 4e9)],
    "cpu": [(32, 4, 4e11), (48, 4, 1e12), (64, 4, 2.5e12), (96, 4, 6e12)],
    # six layers: deep enough for the hidden-state growth Peri-LN is about, and the largest run's
    # 44M tokens within the installed-sources corpus
    "gpu-min": [(128, 6, 2.5e14), (192, 6, 6e14), (256, 6, 1.5e15), (384, 6, 3.5e15)],
    "gpu": [(256, 8, 3e16), (384, 8, 1e17), (512, 8, 3e17), (768, 8, 1e18)],
}
LRS = {"tiny": [3e-3, 1e-2], "cpu": [4e-3, 1.2e-2], "gpu-min": [3e-3, 9e-3], "gpu": [1e-3, 3e-3]}


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
    choice = choose(finals, [arm, "label_budget"])  # each arm at each budget at its own LR
    best = choice.rows
    budgets = sorted(set(best["label_budget"]))
    means = best.groupby([arm, "label_budget"])["loss"].mean()
    losses = {name: [float(means[(name, b)]) for b in budgets] for name in (BASELINE, VARIANT)}
    compute = [float(best.loc[best["label_budget"] == b, "C"].mean()) for b in budgets]
    result = compute_multiplier(compute, losses[BASELINE], losses[VARIANT])
    multiplier = measured(f"{VARIANT} compute multiplier over {BASELINE}", result.estimate, "x", choice.edges())
    trend = measured(f"trend of the log-loss offset {VARIANT} − {BASELINE} per unit log C", result.trend)
    pairs = {b: paired_by_seed(best[(best[arm] == VARIANT) & (best["label_budget"] == b)],
                               best[(best[arm] == BASELINE) & (best["label_budget"] == b)]) for b in budgets}
    noise = paired_noise(pairs.values())
    more = [trend]
    for b in budgets:
        gap = relative_gap(*pairs[b], noise, paired=True)
        more.append(measured(f"relative loss gap {VARIANT} − {BASELINE} at C = {b:.3g}", gap,
                             caveats=choice.edges({"label_budget": b})))
    rows = []
    for row, b in zip(result.per_budget, budgets):
        g = best[best["label_budget"] == b]
        row.update(budget=b, d_model=int(g["width"].iloc[0]))
        row.update({f"{name}_lr": float(choice.cells.loc[(choice.cells[arm] == name) & (choice.cells["label_budget"] == b),
                                                           "lr"].iloc[0]) for name in (BASELINE, VARIANT)})
        rows.append(row)
    notes = [f"agree: the multiplier's interval lies above 1 ({VARIANT} needs less compute)",
             f"learning rates: {choice.method}"]
    return Analysis(multiplier, more, {"frontiers": rows, "spikes": _spikes(finals, arm)},
                    [_plot(ctx, rows), *lr_plot(ctx, finals, choice)], notes)


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
    return above(analysis.headline, 1,
                 agree=f"{VARIANT} needs less compute across the whole interval",
                 disagree=f"{VARIANT} needs more compute across the whole interval",
                 holds="the multiplier's interval holds 1",
                 undecided="no interval for the multiplier, or a caveat on it")


register(Study(
    name="ablation", version=3,
    changes="statistics: the multiplier is paired by budget (the baseline's frontier and the variant's "
            "log-loss offset) instead of a bootstrap over each arm's budgets; LRs at the edge of their grid "
            "are named and no verdict rests on them.",
    paper="Kim et al. 2025, Peri-LN: Revisiting Layer Normalization in the Transformer Architecture",
    claim="Normalising each sublayer's input and output (Peri-LN) reaches a lower loss than Pre-LN at "
          "equal compute (a compute multiplier above 1) and trains more stably.",
    sweeps=sweeps, analyse=analyse, verdict=verdict, sizes=SIZES,
    caveat="The paper's gains come from stability at scale and high LRs; shallow small models rarely "
           "show the hidden-state growth Peri-LN prevents, and two LRs per arm is a coarse tuning.",
))
