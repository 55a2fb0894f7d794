"""Loss against learning rate, one curve per setting with its chosen LR marked (the studies'
LR-sensitivity plots), and the fitted hyperparameter rules against the tuned points
(`testbed fit --hparams`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from testbed.fit.reporting.style import DPI, SizeColours, pyplot, save, short, tick_label


@dataclass
class LrCurve:
    """One cell's loss against learning rate: `lr` sorted, `chosen` the LR picked for it (None:
    none), `size` its model size (colours the curves when every curve has one), `panel` the
    axes it shares with others (curves of one panel, e.g. one N at several D)."""

    label: str
    lr: np.ndarray
    loss: np.ndarray
    chosen: float | None = None
    size: float | None = None
    panel: str = ""


def lr_sensitivity(curves: list[LrCurve], path: Path, title: str, chosen_label: str = "chosen LR",
                   ylabel: str = "final validation loss", dpi: int = DPI) -> str:
    """Loss against learning rate, one line per cell, the chosen LR of each marked: ★ on the curve
    inside its grid, ☆ at the grid's edge (the optimum may lie beyond), ▷/◁ at the edge when the
    chosen LR lies outside the grid. Curves with a `panel` get one axes per panel. Losses over
    1.25x the lowest are cut off at the top, so a diverged LR does not flatten the rest."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    panels = list(dict.fromkeys(c.panel for c in curves))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    width = 4.6 * cols + (2.0 if len(panels) == 1 else 0.4)  # one panel: its legend beside it
    fig, axes = plt.subplots(rows, cols, figsize=(width, 3.6 * rows + 0.3), squeeze=False)
    sized = len(panels) == 1 and all(c.size is not None for c in curves) and len({c.size for c in curves}) == len(curves)
    colours = SizeColours([c.size for c in curves]) if sized else None
    if colours is not None and len(colours.sizes) > 1:  # sizes too close to tell apart: colour by order instead
        spots = np.sort([float(colours.norm(math.log10(n))) for n in colours.sizes])
        colours = colours if np.diff(spots).min() >= 0.12 else None
    kinds: set[str] = set()
    for ax, panel in zip(axes.ravel(), panels):
        mine = [c for c in curves if c.panel == panel]
        palette = plt.get_cmap("viridis")(np.linspace(0, 0.85, max(len(mine), 1)))
        lowest = min(float(np.nanmin(c.loss)) for c in mine)
        highest = max(float(np.nanmax(c.loss)) for c in mine)
        for i, curve in enumerate(mine):
            colour = colours.colour(curve.size) if colours is not None and curve.size is not None else palette[i]
            ax.plot(curve.lr, curve.loss, "o-", color=colour, ms=4, lw=1.2, label=curve.label)
            if curve.chosen is None or len(curve.lr) == 0:
                continue
            low, high = float(np.min(curve.lr)), float(np.max(curve.lr))
            if curve.chosen < low * (1 - 1e-9) or curve.chosen > high * (1 + 1e-9):
                at = low if curve.chosen < low else high
                y = float(curve.loss[np.argmin(np.abs(curve.lr - at))])
                ax.plot(at, y, "<" if curve.chosen < low else ">", color=colour, ms=10, mfc="white", mew=1.5)
                kinds.add("beyond")
            else:
                y = float(np.interp(np.log(curve.chosen), np.log(curve.lr), curve.loss))
                edge = len(curve.lr) > 1 and (math.isclose(curve.chosen, low) or math.isclose(curve.chosen, high))
                ax.plot(curve.chosen, y, "*", color=colour, ms=14, mec="k", mew=0.7, mfc="white" if edge else colour,
                        zorder=4)
                kinds.add("edge" if edge else "inside")
        ax.set_xscale("log")
        cut = highest > 1.25 * lowest
        if cut:
            ax.set_ylim(lowest - 0.02 * lowest, 1.25 * lowest)
        ax.set(xlabel="learning rate", ylabel=ylabel + (" (cut at 1.25x the lowest)" if cut else ""))
        if panel:
            ax.set_title(panel, fontsize=9)
        if len(panels) == 1:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=7, loc="best")
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    marks = {"inside": Line2D([], [], color="0.6", marker="*", ms=11, mec="k", ls="", label=chosen_label),
             "edge": Line2D([], [], color="0.6", marker="*", ms=11, mec="k", mfc="white", ls="",
                            label=f"{chosen_label}, at its grid's edge"),
             "beyond": Line2D([], [], color="0.4", marker=">", ms=8, mfc="white", ls="",
                              label=f"{chosen_label} beyond the grid (arrow at the edge)")}
    if kinds:
        fig.legend(handles=[marks[k] for k in ("inside", "edge", "beyond") if k in kinds], fontsize=7,
                   loc="lower center", ncol=3, frameon=False)
    fig.suptitle(title, fontsize=10)
    return save(fig, path, plt, dpi, rect=(0, 0.06 if kinds else 0, 1, 1))


def hparams_plot(frame, rules: dict, path: Path, dpi: int = DPI) -> str:
    """`testbed fit hparams`: loss against LR for each (N, D) cell of an LR x batch sweep, at the
    best batch size of each LR, with the fitted rule's lr_opt(N, D) marked (else the best run's
    LR). One axes when every N has one D; else one axes per N, a line per D."""
    from testbed.fit.laws import steplaw

    frame = frame.dropna(subset=["N", "D", "lr", "loss"])
    per_n = frame.groupby("N")["D"].nunique()
    panels = bool((per_n > 1).any())
    fitted = rules.get("lr_coef") is not None
    curves = []
    for (n, d), cell in frame.groupby(["N", "D"], sort=True):
        best = cell.groupby("lr")["loss"].min().sort_index()
        predicted = steplaw.predict(rules, n, d)[0] if fitted else None
        chosen = float(predicted) if predicted is not None else float(best.idxmin())
        curves.append(LrCurve(label=f"D = {short(d)}" if panels else f"N = {short(n)}, D = {short(d)}",
                              lr=best.index.to_numpy(float), loss=best.to_numpy(float), chosen=chosen,
                              size=float(n), panel=f"N = {short(n)}" if panels else ""))
    varies = "batch" in frame.columns and frame.groupby(["N", "D", "lr"])["batch"].nunique().max() > 1
    title = "loss against learning rate" + (", best batch size at each LR" if varies else "") + \
        " (N: non-embedding parameters)"
    chosen_label = "lowest loss"
    if fitted:
        coef = tick_label(float(f"{rules['lr_coef']:.3g}")).strip("$")
        a, b = rules["lr_N_exp"], rules["lr_D_exp"]
        chosen_label = f"lr_opt of the fitted rule ${coef}\\,N^{{{a:.3f}}}\\,D^{{{b:.3f}}}$"
    return lr_sensitivity(curves, path, title, chosen_label=chosen_label, ylabel="final loss", dpi=dpi)
