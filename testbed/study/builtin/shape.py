"""Width vs depth at a fixed number of non-embedding parameters (Kaplan et al. 2020, Fig. 5)."""

from __future__ import annotations

from typing import Any

import numpy as np

from testbed.stats import seed_noise, spread
from testbed.study.base import SIZES, Analysis, Context, Study, choose, figure, lr_plot, measured, register
from testbed.study.recipes import BATCH, base, seeds, width_for

TOLERANCE = 0.03  # Kaplan et al.: a few percent across aspect ratios spanning a wide band


def shapes(size: str) -> list[tuple[int, int]]:
    """(d_model, n_layers) pairs at about the same 12 L d^2."""
    n, layers, multiple = {"tiny": (12_000, [1, 2, 4], 4), "cpu": (200_000, [1, 2, 4, 8], 16),
                           "gpu-min": (3_000_000, [2, 4, 8, 16], 64),
                           "gpu": (25_000_000, [2, 4, 8, 16, 32], 64)}[size]
    return [(width_for(n, layer, multiple), layer) for layer in layers]


def lrs(size: str) -> list[float]:
    """Each shape at its own tuned LR from this grid (one layer and eight want different ones)."""
    return {"tiny": [3e-3, 1e-2], "cpu": [4e-3, 1.2e-2], "gpu-min": [2e-3, 6e-3], "gpu": [1e-3, 3e-3]}[size]


def sweeps(size: str) -> list[dict[str, Any]]:
    pairs = shapes(size)
    tree = base(size)
    tree["train"]["tokens"] = {"tiny": 32, "cpu": 400, "gpu-min": 900, "gpu": 10000}[size] * BATCH[size]
    heads = 2 if size == "tiny" else None
    zipped: dict[str, Any] = {"model.d_model": [d for d, _ in pairs], "model.n_layers": [n for _, n in pairs]}
    spec: dict[str, Any] = {"name": "shape", "base": tree, "zip": zipped, "grid": {"optim.lr": lrs(size), "train.seed": seeds(size)},
                            "labels": ["model.d_model", "model.n_layers", "optim.lr", "train.seed"]}
    spec["derived"] = {"model.n_heads": heads if heads else "max(1, d_model // 64)"}
    return [spec]


def analyse(ctx: Context) -> Analysis:
    finals = ctx.finals("shape")
    choice = choose(finals, ["width", "depth"])
    chosen = choice.rows
    groups = {(int(w), int(d)): g["loss"].to_numpy(float) for (w, d), g in chosen.groupby(["width", "depth"])}
    keys = sorted(groups, key=lambda k: k[0] / k[1])
    # Seed noise from every shape at every LR: the variance between seeds does not depend on
    # which LR was chosen, and pooling it gives the few seeds per shape an honest interval.
    noise = seed_noise([g["loss"] for _, g in finals.groupby(["width", "depth", "peak_lr"])])
    ratios = [k[0] / k[1] for k in keys]
    headline = measured(f"relative loss spread over aspect ratios d/L {min(ratios):.3g}–{max(ratios):.3g}",
                        spread([groups[k] for k in keys], noise), caveats=choice.edges())
    cells = choice.cells.set_index(["width", "depth"])
    rows = [{"d_model": k[0], "n_layers": k[1], "aspect": k[0] / k[1],
             "N_non_embedding": float(finals.loc[(finals["width"] == k[0]) & (finals["depth"] == k[1]),
                                                 "N_non_embedding"].iloc[0]),
             "lr": float(cells.loc[k, "lr"]), "lr_edge": cells.loc[k, "edge"] or "inside",
             "loss": float(np.exp(np.log(groups[k]).mean())), "seeds": len(groups[k])} for k in keys]
    return Analysis(headline, [], {"shapes": rows}, [_plot(ctx, rows), *lr_plot(ctx, finals, choice)],
                    [f"tolerance: spread at most {TOLERANCE:.0%}", f"learning rates: {choice.method}"])


def _plot(ctx: Context, rows: list[dict]) -> str:
    with figure(ctx.out / "shape.png", "aspect ratio d_model / n_layers") as ax:
        ax.plot([r["aspect"] for r in rows], [r["loss"] for r in rows], "o-")
    return "shape.png"


def verdict(analysis: Analysis) -> tuple[str, str]:
    from testbed.study.base import at_most

    result = at_most(analysis.headline, TOLERANCE)
    why = {"agree": f"the whole interval of the spread is under {TOLERANCE:.0%}",
           "disagree": f"the whole interval of the spread is above {TOLERANCE:.0%}",
           "inconclusive": f"the interval straddles {TOLERANCE:.0%} or is missing (one seed)"}[result]
    return result, why


register(Study(
    name="shape", version=3,
    changes="statistics: seeds vary the data order too; the spread's interval comes from the seed noise "
            "pooled over every shape and LR (was: a bootstrap of two seeds); LRs cross-fitted between seeds, "
            "and those at the edge of their grid named.",
    paper="Kaplan et al. 2020, Scaling Laws for Neural Language Models (Fig. 5)",
    claim="At a fixed number of non-embedding parameters, loss depends only weakly on the shape: "
          "width vs depth changes it by a few percent across a wide band of aspect ratios.",
    sweeps=sweeps, analyse=analyse, verdict=verdict, sizes=SIZES,
    caveat="Kaplan's band is d/L ~ 10-200 at 10^6-10^9 parameters; small models force extreme shapes "
           "(one layer, or very narrow), where depth does matter; each shape's LR is the better of two, "
           "and the runs are short (4 tokens per parameter at cpu size).",
))
