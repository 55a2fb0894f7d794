"""Width vs depth at a fixed number of non-embedding parameters (Kaplan et al. 2020, Fig. 5).

Shapes of about the same 12 L d^2, each over one LR grid with seeds that vary the data order too;
each shape takes its own best LR (cross-fitted between seeds), and the report gives the relative
loss spread across the shapes with its interval.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from testbed.stats import seed_noise, spread
from testbed.study.base import SIZES, Analysis, Context, Study, choose, figure, lr_plot, measured, register
from testbed.study.recipes import BATCH, seeds, small_vocab_base, width_for

TOLERANCE = 0.03  # Kaplan et al.: a few percent across aspect ratios spanning a wide band


def shapes(size: str) -> list[tuple[int, int]]:
    """(d_model, n_layers) pairs at about the same 12 L d^2. From cpu size up, every shape has two
    or more layers and an aspect ratio d/L inside Kaplan's band (about 20-200): at cpu size 600k
    non-embedding parameters as d160 x 2 to d96 x 5 (d/L 80 to 19), more than the embedding and
    head hold (100k-160k at the 512-token BPE)."""
    n, layers, multiple = {"tiny": (12_000, [2, 3, 4], 4), "cpu": (600_000, [2, 3, 4, 5], 16),
                           "gpu-min": (3_000_000, [2, 4, 8], 64),
                           "gpu": (25_000_000, [4, 6, 8, 16], 64)}[size]
    return [(width_for(n, layer, multiple), layer) for layer in layers]


def lrs(size: str) -> list[float]:
    """Each shape at its own tuned LR from this grid: four points a factor 2 apart at cpu size
    around the optimum expected for these widths (v3's two points, 4e-3 and 1.2e-2, put every
    shape's LR at an edge, the wider ones at the bottom; AdamW's best LR falls about as 1/d_model,
    and the deeper, narrower shapes want the higher LRs)."""
    return {"tiny": [3e-3, 1e-2, 3e-2], "cpu": [1.25e-3, 2.5e-3, 5e-3, 1e-2], "gpu-min": [1.5e-3, 3e-3, 6e-3],
            "gpu": [6e-4, 1.2e-3, 2.4e-3, 4.8e-3]}[size]


def sweeps(size: str) -> list[dict[str, Any]]:
    pairs = shapes(size)
    tree = small_vocab_base(size)
    tree["train"]["tokens"] = {"tiny": 32, "cpu": 270, "gpu-min": 900, "gpu": 10000}[size] * BATCH[size]
    heads = {"tiny": 2, "cpu": "max(1, d_model // 16)"}.get(size, "max(1, d_model // 64)")
    zipped: dict[str, Any] = {"model.d_model": [d for d, _ in pairs], "model.n_layers": [n for _, n in pairs]}
    return [{"name": "shape", "base": tree, "zip": zipped,
             "grid": {"optim.lr": lrs(size), "train.seed": seeds(size)}, "derived": {"model.n_heads": heads},
             "labels": ["model.d_model", "model.n_layers", "optim.lr", "train.seed"]}]


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
           "inconclusive": f"the interval straddles {TOLERANCE:.0%} or is missing (a single seed gives none)"}[result]
    return result, why


register(Study(
    name="shape", version=4,
    changes="600k non-embedding parameters as four shapes of 2-5 layers, d/L 19-80, inside Kaplan's band (v3: 200k, "
            "down to one layer at d/L 128, with embeddings larger than N), on a 512-token BPE, 270 steps; a "
            "four-point LR grid (1.25e-3 to 1e-2) where v3's two points put every shape's LR at an edge; gpu-min "
            "and gpu shapes inside the band too, on three- and four-point grids; claim and rule unchanged.",
    paper="Kaplan et al. 2020, Scaling Laws for Neural Language Models (Fig. 5)",
    claim="At a fixed number of non-embedding parameters, loss depends only weakly on the shape: "
          "width vs depth changes it by a few percent across a wide band of aspect ratios.",
    sweeps=sweeps, analyse=analyse, verdict=verdict, sizes=SIZES,
    caveat="Kaplan's models train near convergence at 10^6-10^9 parameters; these runs are short (about one "
           "token per non-embedding parameter at cpu size), where shapes differ in how fast they train more "
           "than in what they can reach; widths rounded to 16 leave N within ±7% across the shapes; the band "
           "covered (a factor of four in d/L) is narrower than Kaplan's.",
))
