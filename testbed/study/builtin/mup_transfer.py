"""Learning-rate transfer across widths under µP and SP (Yang et al. 2022, Tensor Programs V).

Both parametrisations (docs/mup.md) train four widths, base·{1, 2, 4, 8} at a fixed n_heads
(d_head grows with the width, as µP's attention scale here assumes), over an LR grid a factor 2
apart, with seeds that vary the data order, every width on the same tokens (transfer is measured
at a fixed horizon). Per (parametrisation, width) the optimal LR is located in log2 LR: the best
grid point of the mean log loss over seeds, refined by the parabola through it and its two
neighbours. The headline is the drift of log2(optimal LR) per doubling of width under µP, a
least-squares slope over the four widths, with a parametric bootstrap of the mean losses under the
seed noise pooled over every cell (`lr_drift`); SP's drift beside it. A coordinate check
(testbed.train.mup.coordinate_check, a few AdamW steps in memory) runs after the sweeps: the
slope of each layer's activation scale against width, per parametrisation.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from testbed.stats import Estimate, SeedNoise, seed_noise
from testbed.stats.curves import percentile
from testbed.study.base import (
    Analysis,
    Context,
    Study,
    choose,
    combine,
    decidable,
    lr_plot,
    measured,
    register,
    within,
)
from testbed.study.recipes import BATCH, seeds, small_vocab_base

NAME = "mup-transfer"
PARAMETRIZATIONS = ("sp", "mup")
# µP's drift must stay within ±0.25 octave of LR per doubling of width: over the three doublings
# (8x) that is at most 0.75 octave, less than one step of the factor-2 grid, where SP's 1/width
# rule for Adam predicts −1 per doubling (3 octaves), four times the tolerance.
TOLERANCE = 0.25
COORD_STEPS = 4  # AdamW steps before the coordinate check measures (Yang et al.'s D.1 uses a few)
COORD_FILE = "coord_check.json"

BASE_WIDTH = {"tiny": 16, "cpu": 32, "gpu": 128}
# base·{1, 2, 4, 8}; tiny checks the mechanics on two widths (its 30 s allow about eight runs).
WIDTHS = {size: [w * m for m in ((1, 4) if size == "tiny" else (1, 2, 4, 8))] for size, w in BASE_WIDTH.items()}
LAYERS = {"tiny": 2, "cpu": 2, "gpu": 4}  # shallow: the CPU cost grows fast with width
HEADS = {"tiny": 2, "cpu": 2, "gpu": 4}  # fixed across widths: d_head grows with d_model
# Every width trains the same tokens: about 110 steps of 2048 tokens at cpu size.
TOKENS = {"tiny": 32 * BATCH["tiny"], "cpu": 110 * BATCH["cpu"], "gpu": 3000 * BATCH["gpu"]}
# The grid's centre at the base width (both parametrisations agree there: µP at m = 1 is SP bit
# for bit), and its steps in octaves around the centre. At cpu size one-seed probes of these runs
# (testbed.train.mup.lr_point, 110 steps) found 1e-2 best of 2.5e-3..4e-2 at d_model 32, µP's
# d_model 256 best at 1e-2 of 5e-3..2e-2, and SP's at 256 better at 1.25e-3 than at 2.5e-3.
CENTRE = {"tiny": 1e-2, "cpu": 1e-2, "gpu": 4e-3}
STEPS = {"tiny": [0, 1], "cpu": [-2, -1, 0, 1, 2], "gpu": [-2, -1, 0, 1, 2]}
# Where each parametrisation's grid is centred, in octaves per doubling of width: µP's stays put;
# SP's follows the 1/width rule for Adam (docs/mup.md measured its optimum falling at least 8x from
# d_model 32 to 256), so the best of its ±2-octave grid is inside the grid at 8x the base width
# for drifts from about −1/2 to −3/2 per doubling (an optimum within 1.5 octaves of the centre).
CENTRE_DRIFT = {"sp": -1.0, "mup": 0.0}


def sweep_name(parametrization: str) -> str:
    return f"{NAME}-{parametrization}"


def tree(size: str) -> dict[str, Any]:
    """The base config of every run: the size's base at the base width and the study's depth."""
    config = small_vocab_base(size, text_at_tiny=True)
    config["model"].update(d_model=BASE_WIDTH[size], n_layers=LAYERS[size], n_heads=HEADS[size])
    config["optim"]["lr"] = CENTRE[size]
    # An LR above the optimum may diverge; that is the grid's upper side doing its job, not a
    # failed run (the guard would stop the whole study): it is scored by its final loss.
    config["train"]["divergence_nats"] = None
    return config


def centres(size: str, parametrization: str) -> list[float]:
    """The grid's centre at each width."""
    return [CENTRE[size] * (w / BASE_WIDTH[size]) ** CENTRE_DRIFT[parametrization] for w in WIDTHS[size]]


def sweeps(size: str) -> list[dict[str, Any]]:
    """One sweep per parametrisation; µP's leaves out the base width, where it is SP bit for bit
    (docs/mup.md; tested), so SP's runs there serve both (`finals`)."""
    specs = []
    for parametrization in PARAMETRIZATIONS:
        widths, grid_centres = WIDTHS[size], centres(size, parametrization)
        run_tree = copy.deepcopy(tree(size))
        run_tree["train"]["tokens"] = TOKENS[size]
        if parametrization == "mup":
            widths, grid_centres = widths[1:], grid_centres[1:]
            run_tree["model"]["mup_base_width"] = BASE_WIDTH[size]
        specs.append({"name": sweep_name(parametrization), "base": run_tree,
                      "zip": {"model.d_model": widths, "labels.centre": grid_centres},
                      "grid": {"model.parametrization": [parametrization], "labels.octave": STEPS[size],
                               "train.seed": seeds(size)},
                      "derived": {"optim.lr": "labels.centre * 2 ** labels.octave"},
                      "labels": ["model.parametrization", "model.d_model", "labels.octave", "train.seed"]})
    return specs


def finals(ctx: Context):
    """The final points of both sweeps, SP's base-width runs counted for µP too."""
    import pandas as pd

    sp, mup = (ctx.finals(sweep_name(p)) for p in PARAMETRIZATIONS)
    shared = sp[sp["width"] == BASE_WIDTH[ctx.size]].assign(label_parametrization="mup")
    return pd.concat([sp, shared, mup], ignore_index=True)


# ------------------------------------------------------------------------------- the drift


def vertex(log2_lr: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """log2 of the optimal LR per row of `loss` (rows: draws, columns: the grid `log2_lr`,
    ascending): the best grid point, moved to the vertex of the parabola through it and its two
    neighbours (which lies between them); at a grid edge, or beside a diverged run, the point itself."""
    loss = np.atleast_2d(loss)
    ranked = np.where(np.isfinite(loss), loss, np.inf)
    best = np.argmin(ranked, axis=1)
    optimum = log2_lr[best].astype(float)
    inner = (best > 0) & (best < len(log2_lr) - 1)
    rows = np.flatnonzero(inner)
    if rows.size:
        i = best[rows]
        x0, x1, x2 = log2_lr[i - 1], log2_lr[i], log2_lr[i + 1]
        y0, y1, y2 = ranked[rows, i - 1], ranked[rows, i], ranked[rows, i + 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            # the vertex of the parabola through three points (any spacing)
            num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
            den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
            moved = x1 - 0.5 * num / den
        usable = np.isfinite(moved) & np.isfinite(y0) & np.isfinite(y2)
        optimum[rows[usable]] = np.clip(moved[usable], x0[usable], x2[usable])
    return optimum


def drift_slope(log2_widths: np.ndarray, optima: np.ndarray) -> np.ndarray:
    """Least-squares slope of log2(optimal LR) against log2(width), per row of `optima`."""
    x = log2_widths - log2_widths.mean()
    return (np.atleast_2d(optima) - np.atleast_2d(optima).mean(axis=1, keepdims=True)) @ x / (x @ x)


def lr_drift(cells: Sequence[dict[str, Any]], noise: SeedNoise | None, draws: int = 2000, seed: int = 0) -> Estimate:
    """The drift of log2(optimal LR) per doubling of width over `cells`, each {width, lrs, losses,
    seeds}: one width's ascending LR grid, the mean log loss over seeds at each LR and the number of
    seeds behind each mean. The interval is a parametric bootstrap: each mean drawn around itself
    with the pooled seed variance (itself drawn from its chi-square, so few degrees of freedom
    widen it as a t interval would), the optima and the slope recomputed."""
    log2_widths = np.log2([c["width"] for c in cells])
    grids = [np.log2(np.asarray(c["lrs"], float)) for c in cells]
    means = [np.asarray(c["losses"], float) for c in cells]
    optima = np.array([vertex(g, m)[0] for g, m in zip(grids, means)])
    value = float(drift_slope(log2_widths, optima)[0])
    if noise is None:
        return Estimate(value, method="one seed and no pooled seed noise: no interval")
    rng = np.random.default_rng(seed)
    sd = np.sqrt(noise.variance * noise.df / rng.chisquare(noise.df, size=draws))
    drawn = np.column_stack([
        vertex(g, m[None, :] + rng.standard_normal((draws, len(m))) * sd[:, None] / np.sqrt(np.asarray(c["seeds"], float)))
        for g, m, c in zip(grids, means, cells)])
    low, high = percentile(drift_slope(log2_widths, drawn))
    return Estimate(value, low, high, "optimum: parabola in log2 LR through the best grid point and its neighbours; "
                                      "slope by least squares over log2 width; parametric bootstrap of the mean log "
                                      f"losses ({noise.describe()})")


def drift_cells(finals, parametrization: str) -> list[dict[str, Any]]:
    """`lr_drift`'s cells of one parametrisation from the final points."""
    rows = finals[finals["label_parametrization"] == parametrization]
    cells = []
    for width, group in rows.groupby("width"):
        by_lr = group.assign(log_loss=np.log(group["loss"].astype(float))).groupby("peak_lr")["log_loss"]
        cells.append({"width": int(width), "lrs": by_lr.mean().index.to_numpy(float),
                      "losses": by_lr.mean().to_numpy(float), "seeds": by_lr.size().to_numpy(float)})
    return cells


# ---------------------------------------------------------------------- coordinate check


def coordinate_rows(size: str) -> list[dict]:
    """testbed.train.mup.coordinate_check on the study's base config at its widths, both parametrisations."""
    from testbed.config import load_config
    from testbed.train.mup import coordinate_check

    base_tree = tree(size)
    base_tree["model"].update(parametrization="mup", mup_base_width=BASE_WIDTH[size])
    config = load_config(base_tree)
    return coordinate_check(config, WIDTHS[size], steps=COORD_STEPS)


def extra(ctx: Context, options: dict[str, Any]) -> None:
    """After the sweeps: the coordinate check (seconds; in memory), kept for `study report`."""
    (ctx.out / COORD_FILE).write_text(json.dumps(coordinate_rows(ctx.size), indent=1) + "\n")


def coordinate_table(ctx: Context) -> list[dict[str, Any]]:
    """Per parametrisation the slope of each layer's mean |activation| against width, after the
    last step; [] when the check has not run (a report before `study run` finished)."""
    from testbed.train.mup import slopes

    path = ctx.out / COORD_FILE
    if not path.is_file():
        return []
    fitted = slopes(json.loads(path.read_text()))
    layers = list(dict.fromkeys(layer for _, layer in fitted))
    return [{"parametrization": p, **{layer: round(fitted[p, layer], 3) for layer in layers}}
            for p in PARAMETRIZATIONS if (p, layers[0]) in fitted]


# ------------------------------------------------------------------------------ analysis


def analyse(ctx: Context) -> Analysis:
    points = finals(ctx)
    choice = choose(points, ["label_parametrization", "width"])
    # Seed noise of the log loss from every (parametrisation, width, LR) with finite losses, each
    # run once (the shared base-width runs are not counted twice).
    finite = points[np.isfinite(points["loss"].astype(float))].drop_duplicates("run_id")
    noise = seed_noise([g["loss"] for _, g in finite.groupby(["label_parametrization", "width", "peak_lr"])])
    drifts = {p: measured(f"{'µP' if p == 'mup' else 'SP'} drift of log2(optimal LR) per doubling of width",
                          lr_drift(drift_cells(points, p), noise), "octaves",
                          choice.edges({"label_parametrization": p}))
              for p in PARAMETRIZATIONS}
    optima = []
    for p in PARAMETRIZATIONS:
        cells = choice.cells[choice.cells["label_parametrization"] == p].set_index("width")
        for cell in drift_cells(points, p):
            located = float(vertex(np.log2(cell["lrs"]), cell["losses"])[0])
            optima.append({"parametrization": p, "d_model": cell["width"], "lr_chosen": float(cells.loc[cell["width"], "lr"]),
                           "lr_optimum": 2.0 ** located, "lr_edge": cells.loc[cell["width"], "edge"] or "inside",
                           "loss": float(np.exp(cell["losses"].min())), "seeds": int(cell["seeds"].max())})
    coords = coordinate_table(ctx)
    notes = [f"agree: µP's drift interval lies within ±{TOLERANCE} octave per doubling of width (at most "
             f"{3 * TOLERANCE:g} octave over the 8x, under one grid step) and SP's lies below 0; disagree: µP's lies "
             f"wholly outside ±{TOLERANCE}, or SP's wholly above 0; inconclusive otherwise, or when a drift rests on "
             "an LR at its grid's edge",
             f"learning rates: {choice.method}; the drift uses each width's parabola-refined optimum (lr_optimum); "
             "µP's base width is SP's runs there (the same model and updates at m = 1)"]
    if coords:
        notes.append(f"coordinate check: slope of mean |activation| against width after {COORD_STEPS} AdamW steps "
                     "(µP: about 0; SP: grows with width)")
    else:
        notes.append("coordinate check: not run (it runs after the sweeps in `study run`)")
    tables = {"optima": optima, **({"coordinate_check": coords} if coords else {})}
    return Analysis(drifts["mup"], [drifts["sp"]], tables, lr_plot(ctx, points, choice, "mup_transfer.png"), notes)


def verdict(analysis: Analysis) -> tuple[str, str]:
    sp = analysis.more[0]
    drifts_down = ("inconclusive" if not decidable(sp) else "agree" if sp.high < 0
                   else "disagree" if sp.low > 0 else "inconclusive")
    return combine([within(analysis.headline, TOLERANCE), drifts_down],
                   disagree=f"µP's optimal LR drifts by more than {TOLERANCE} octave per doubling of width, "
                            "or SP's rises with width",
                   agree=f"µP's optimal LR stays within ±{TOLERANCE} octave per doubling of width while SP's falls",
                   inconclusive="an interval straddles its threshold, or rests on an LR at its grid's edge")


register(Study(
    name=NAME, version=1,
    paper="Yang et al. 2022, Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer",
    claim="Under µP the optimal learning rate found at the base width carries over to 8x the width; under "
          "standard parametrisation it drifts (for Adam, roughly as 1/width). Beside it, the coordinate check: "
          "under µP the activations' scale stays flat across widths after a few steps, under SP it grows.",
    sweeps=sweeps, analyse=analyse, verdict=verdict, extra=extra,
    caveat="Short runs (110 steps at cpu size) of two-layer models 32-256 wide, where the paper tunes at "
           "widths of hundreds to thousands over longer horizons; the input and output multipliers stay at 1 "
           "(untuned), weight decay scales with the hidden LR; warmup and the other hyperparameters are not "
           "transferred, only tried at one value; the optimum is located by a parabola through three grid points "
           "a factor 2 apart, which assumes the loss is near quadratic in log LR there.",
))
