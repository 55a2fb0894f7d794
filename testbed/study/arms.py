"""Two arms across a ladder of budgets, each arm at its own tuned LR: the variant's compute
multiplier over the baseline, overall and at each budget, with intervals.

A study of an intervention (an optimiser, a norm placement, a part of your own) trains both
arms at each (size, budget) rung over an LR grid and some seeds; `compare_arms` chooses each
arm's LR per rung without the winner's curse (testbed.stats.choice), pairs the arms by seed, and
measures:
- the headline multiplier, paired by budget (testbed.stats.curves.compute_multiplier): constant
  over the budgets, or at the largest one where the offset trends with compute;
- the trend of the log-loss offset per unit log C (> 0: the variant's lead shrinks with scale);
- the multiplier at each budget (testbed.stats.curves.budget_multipliers), each with its own
  interval from the seed noise pooled over the budgets.
An LR at the edge of its grid is named as a caveat on every figure that rests on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from testbed.stats.curves import budget_multipliers, compute_multiplier
from testbed.study.base import (
    Analysis,
    Bracket,
    Context,
    Measurement,
    choose,
    figure,
    lr_plot,
    measured,
    paired_by_seed,
)


@dataclass(frozen=True)
class Arms:
    """The config key the arms differ in and its two values."""

    key: str
    baseline: str
    variant: str

    @property
    def column(self) -> str:
        """The points table's column of the arm (its label)."""
        return "label_" + self.key.rsplit(".", 1)[1]


def ladder_sweeps(name: str, tree: dict[str, Any], arms: Arms, ladder: list[tuple[int, int, float]],
                  lrs: dict[str, list[float]], batch: int, seeds: list[int] | None = None,
                  heads: int | str = "max(1, d_model // 32)") -> list[dict[str, Any]]:
    """One sweep per arm, NAME-ARM: the arm over its own LR grid `lrs[arm]` (x the seeds) at each
    (d_model, n_layers, FLOPs) rung, each run's tokens set so its training FLOPs are the rung's
    budget. Arms whose optima lie apart (Muon's LR above AdamW's) each get a grid around theirs."""
    sweeps = []
    for value in (arms.baseline, arms.variant):
        grid: dict[str, Any] = {arms.key: [value], "optim.lr": lrs[value]}
        labels = [arms.key, "optim.lr", "labels.budget", "model.d_model"]
        if seeds:
            grid["train.seed"] = seeds
            labels.append("train.seed")
        sweeps.append({"name": f"{name}-{value}", "base": tree, "grid": grid,
                       "zip": {"model.d_model": [d for d, _, _ in ladder], "model.n_layers": [n for _, n, _ in ladder],
                               "labels.budget": [c for _, _, c in ladder]},
                       "derived": {"model.n_heads": heads,
                                   "train.tokens": f"max(4, round(labels.budget / flops_per_token / {batch})) * {batch}"},
                       "labels": labels})
    return sweeps


def ladder_brackets(name: str, arms: Arms) -> dict[str, Bracket]:
    """Each arm's LR grid extended past an edge where a rung's optimum lands there (testbed.study.bracket)."""
    return {f"{name}-{value}": Bracket({"optim.lr": "log"}) for value in (arms.baseline, arms.variant)}


def compare_arms(ctx: Context, name: str, arms: Arms) -> Analysis:
    """The multiplier analysis of the module docstring over the final points of the arms' sweeps
    (ladder_sweeps NAME)."""
    import pandas as pd

    finals = pd.concat([ctx.finals(f"{name}-{value}") for value in (arms.baseline, arms.variant)],
                       ignore_index=True)
    arm, base, var = arms.column, arms.baseline, arms.variant
    choice = choose(finals, [arm, "label_budget"])  # each arm at each budget at its own LR
    best = choice.rows
    budgets = sorted(set(best["label_budget"]))
    means = best.groupby([arm, "label_budget"])["loss"].mean()
    compute = [float(best.loc[best["label_budget"] == b, "C"].mean()) for b in budgets]
    result = compute_multiplier(compute, [float(means[(base, b)]) for b in budgets],
                                [float(means[(var, b)]) for b in budgets])
    headline = measured(f"{var} compute multiplier over {base}", result.estimate, "x", choice.edges())
    trend = measured(f"trend of the log-loss offset {var} − {base} per unit log C", result.trend,
                     caveats=choice.edges())
    pairs = [paired_by_seed(best[(best[arm] == base) & (best["label_budget"] == b)],
                            best[(best[arm] == var) & (best["label_budget"] == b)]) for b in budgets]
    per_budget = budget_multipliers(compute, pairs)
    more: list[Measurement] = [trend]
    rows = []
    for b, c, row, estimate in zip(budgets, compute, result.per_budget, per_budget):
        edges = choice.edges({"label_budget": b})
        g = best[best["label_budget"] == b]
        more.append(measured(f"{var} compute multiplier at C = {b:.3g} (d_model {int(g['width'].iloc[0])})",
                             estimate, "x", edges))
        row.update(budget=b, d_model=int(g["width"].iloc[0]), N=float(g["N"].iloc[0]),
                   tokens_per_param=float(g["D"].mean() / g["N"].iloc[0]),
                   multiplier_low=estimate.low, multiplier_high=estimate.high, lr_edge="; ".join(edges) or "inside")
        row.update({f"{name}_lr": float(choice.cells.loc[(choice.cells[arm] == name) & (choice.cells["label_budget"] == b),
                                                           "lr"].iloc[0]) for name in (base, var)})
        rows.append(row)
    notes = [f"learning rates: {choice.method}",
             "per-budget multipliers: the baseline's frontier across the budgets converts each budget's paired "
             "loss offset into compute"]
    plots = [_plot(ctx, name, rows, arms), *lr_plot(ctx, finals, choice)]
    return Analysis(headline, more, {"frontiers": rows}, plots, notes)


def _plot(ctx: Context, name: str, rows: list[dict], arms: Arms) -> str:
    name = f"{name}.png"
    with figure(ctx.out / name, "training FLOPs C") as ax:
        ax.plot([r["C"] for r in rows], [r["baseline_loss"] for r in rows], "o-", label=f"{arms.baseline} (tuned LR)")
        ax.plot([r["C"] for r in rows], [r["variant_loss"] for r in rows], "s-", label=f"{arms.variant} (tuned LR)")
        ax.set_yscale("log")
    return name
