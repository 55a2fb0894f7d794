"""The conventions every testbed plot shares (matplotlib, Agg backend), and their helpers.

- Solid lines are measured or fitted; a dashed line is extrapolated (beyond the points the law
  was fitted to), and the range of the fitted points is shaded grey.
- Colour by model size: a legend with one entry per size (up to eight), else a colorbar of N.
- Log axes get at most about six labelled ticks (whole decades, or 1-2-5 steps within a decade,
  else plain numbers), so tick labels never run into each other; `save` applies them.

A fit's plots (`plots`), the loss curves of runs (`curves_plot`, `testbed plot`) and the LR and
hyperparameter plots (`lr_plots`, also the studies') draw through the helpers here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

DPI = 110
FITTED_RANGE = {"color": "0.88", "zorder": 0}  # the shading of the fitted points' range
LEGEND_SIZES = 8  # up to this many model sizes get a legend entry each; more get a colorbar


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- shared helpers

def tick_label(value: float) -> str:
    """2, 0.003, 30000 as they are; large and tiny values as m×10^e in mathtext."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:g}"
    exponent = math.floor(math.log10(abs(value)) + 1e-9)
    mantissa = float(f"{value / 10**exponent:.2g}")
    if mantissa >= 10:
        mantissa, exponent = mantissa / 10, exponent + 1
    return f"$10^{{{exponent}}}$" if mantissa == 1 else f"${mantissa:g}{{\\times}}10^{{{exponent}}}$"


def log_ticks(low: float, high: float, most: int = 6) -> list[float]:
    """Tick values for a log axis over [low, high]: whole decades over a wide range, 1-3, 1-2-5,
    1-2-3-5 or every mantissa over a narrow one (the coarsest giving three ticks), thinned to at
    most `most`; plain linear steps where even those give fewer than three."""
    if not (low > 0 and high > low and math.isfinite(high)):
        return []
    span = (math.floor(math.log10(low)), math.ceil(math.log10(high)))
    ticks: list[float] = []
    for mantissas in ((1,), (1, 3), (1, 2, 5), (1, 2, 3, 5), tuple(range(1, 10))):
        ticks = [float(f"{m}e{k}") for k in range(span[0], span[1] + 1) for m in mantissas
                 if low * (1 - 1e-9) <= m * 10.0**k <= high * (1 + 1e-9)]
        if len(ticks) >= 3:
            break
    if len(ticks) < 3:
        from matplotlib.ticker import MaxNLocator

        values = MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
        ticks = [float(v) for v in values if low * (1 - 1e-9) <= v <= high * (1 + 1e-9) and v > 0]
    stride = math.ceil(len(ticks) / most)
    return ticks[::stride] if stride > 1 else ticks


def tidy_log_axes(ax) -> None:
    """Replace the ticks of each log axis of `ax` by `log_ticks`, labelled by `tick_label`, and
    leave the minor ticks unlabelled."""
    from matplotlib import ticker

    for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        if axis.get_scale() != "log":
            continue
        ticks = log_ticks(min(limits), max(limits))
        if not ticks:
            continue
        label = short if getattr(axis, "testbed_counts", False) else tick_label
        axis.set_major_locator(ticker.FixedLocator(ticks))
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos, label=label: label(v)))
        axis.set_minor_formatter(ticker.NullFormatter())


def count_axis(axis) -> None:
    """Label this log axis (ax.xaxis, ax.yaxis) as counts: 10k, 30k, 1M (model sizes, tokens)."""
    axis.testbed_counts = True


def save(fig, path: Path, plt=None, dpi: int = DPI, rect=None) -> str:
    """Tidy every log axis, lay out (within `rect` of the figure, if given), write the PNG and
    close the figure."""
    for ax in fig.axes:
        tidy_log_axes(ax)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    (plt or pyplot()).close(fig)
    return str(path)


def short(value: float) -> str:
    from testbed.fit.estimation.guards import short as short_count

    return short_count(value)


class SizeColours:
    """One colour per model size from a perceptual colormap (log N; the palest yellow left out,
    which vanishes on white), with the legend handles or the colorbar that name them."""

    def __init__(self, sizes, label: str = "N"):
        from matplotlib import colormaps
        from matplotlib.colors import ListedColormap, Normalize

        values = np.asarray([s for s in np.asarray(sizes, float).ravel() if np.isfinite(s) and s > 0])
        self.sizes = sorted({float(s) for s in values})
        self.label = label
        low = math.log10(min(self.sizes)) if self.sizes else 0.0
        high = math.log10(max(self.sizes)) if self.sizes else 1.0
        self.norm = Normalize(low, high if high > low else low + 1)
        self.cmap = ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.85, 256)))

    @property
    def use_legend(self) -> bool:
        return len(self.sizes) <= LEGEND_SIZES

    def colour(self, size: float):
        if not (np.isfinite(size) and size > 0):
            return "0.5"
        return self.cmap(self.norm(math.log10(size)))

    def handles(self, marker: str = "o", linestyle: Any = "-") -> list:
        from matplotlib.lines import Line2D

        return [Line2D([], [], color=self.colour(s), marker=marker, linestyle=linestyle, ms=4,
                       label=f"{self.label} = {short(s)}") for s in self.sizes]

    def colorbar(self, fig, ax, title: str = "parameters N"):
        from matplotlib import ticker
        from matplotlib.cm import ScalarMappable

        mappable = ScalarMappable(norm=self.norm, cmap=self.cmap)
        bar = fig.colorbar(mappable, ax=ax, pad=0.02)
        bar.set_label(title)
        low, high = float(self.norm.vmin or 0.0), float(self.norm.vmax or 1.0)
        ticks = [math.log10(t) for t in log_ticks(10**low, 10**high, most=5)]
        bar.set_ticks(ticks)
        bar.ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: short(10**v)))
        return bar


def dashed_beyond(ax, x, y, inside, colour, label_fitted: str | None, label_beyond: str | None, lw=1.5):
    """Draw y(x) solid where `inside` and dashed elsewhere, each part joined to the next."""
    x, y, inside = np.asarray(x, float), np.asarray(y, float), np.asarray(inside, bool)
    solid = np.where(inside, y, np.nan)
    dashed = np.where(inside, np.nan, y)
    # Extend the dashed parts by one point into the solid one, so the curve has no gap.
    edges = np.flatnonzero(np.diff(inside.astype(int)) != 0)
    for i in edges:
        dashed[i] = y[i]
        dashed[i + 1] = y[i + 1]
    lines = []
    if inside.any():
        lines += ax.plot(x, solid, "-", color=colour, lw=lw, label=label_fitted)
    if (~inside).any():
        lines += ax.plot(x, dashed, "--", color=colour, lw=lw, label=label_beyond)
    return lines


def entropy_line(ax, entropy: float | None) -> None:
    """The data's entropy, dotted, where it lies near the points; else a note that it lies below."""
    if entropy is None:
        return
    low, high = ax.get_ylim()
    if entropy >= low - 0.25 * (high - low):
        ax.axhline(entropy, color="k", ls=":", lw=1, label=f"data entropy {entropy:.3g}")
        ax.set_ylim(min(low, entropy - 0.03 * (high - low)), high)
    else:
        ax.text(0.01, 0.01, f"data entropy {entropy:.3g} (below the axis)", transform=ax.transAxes,
                ha="left", va="bottom", fontsize=7, color="0.3")
