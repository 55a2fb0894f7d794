"""PNG plots of a fit (matplotlib, Agg backend), and the conventions every testbed plot shares.

- Solid lines are measured or fitted; a dashed line is extrapolated (beyond the points the law
  was fitted to), and the range of the fitted points is shaded grey.
- Colour by model size: a legend with one entry per size (up to eight), else a colorbar of N.
- Log axes get at most about six labelled ticks (whole decades, or 1-2-5 steps within a decade,
  else plain numbers), so tick labels never run into each other; `save` applies them.

`testbed.fit.reporting.curves_plot` (loss curves of runs, `testbed plot`) and the studies' LR-sensitivity
plots (testbed.study.base.lr_plot) draw through the helpers here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


_pyplot = pyplot  # the older private name


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


_save = save


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


# ----------------------------------------------------------------------------- a fit's plots

# What each plot of a fit shows, in a line (report.md prints it under the plot).
CAPTIONS = {
    "observed_vs_fitted": "Each point's observed loss against the law's; held-out points (x) are predicted, not fitted.",
    "residuals": "Relative residuals against compute, coloured by model size; held-out points are x.",
    "loss_vs_compute": "Every point coloured by model size, the fitted law along each size (thin) and the "
                       "compute-optimal frontier: solid where its optimum lies among the fitted runs, dashed "
                       "where extrapolated; grey: the compute range of the fitted runs.",
    "isoflop": "Per compute budget: its runs, the fitted law (solid, minimum ★) and a parabola in log N "
               "(dotted, minimum ▼).",
    "law": "The points and the fitted law: solid over the fitted range (grey), dashed beyond.",
    "loss_curves": "Each run's points and the law's curve: solid over the fitted rows, dashed over held-out rows.",
    "frontiers_by_variant": "Each variant's points and compute-optimal frontier, dashed beyond the fitted compute.",
}


def write_plots(analysis, out_dir: Path, dpi: int = DPI) -> list[str]:
    from testbed.fit.laws import law_inputs

    plt = pyplot()
    law, frame, result = analysis.law, analysis.frame, analysis.result
    written: list[str] = []
    if analysis.groups:
        return written + _comparison_plot(analysis, out_dir, plt, dpi)
    observed = frame["loss"].to_numpy(float)
    predicted = result.predict(law_inputs(law, frame))
    held = frame["held_out"].to_numpy(bool)

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(observed[~held], predicted[~held], s=12, label="fitted points")
    if held.any():
        ax.scatter(observed[held], predicted[held], s=30, marker="x", color="red", label="held out (predicted)")
    lims = [min(observed.min(), predicted.min()), max(observed.max(), predicted.max())]
    ax.plot(lims, lims, "k:", lw=1, label="observed = fitted")
    ax.set(xlabel="observed loss", ylabel="fitted loss", title=f"{law.name}: observed vs fitted")
    ax.legend(fontsize=8)
    written.append(save(fig, out_dir / "observed_vs_fitted.png", plt, dpi))

    written.append(_residuals_plot(analysis, observed, predicted, held, out_dir, plt, dpi))
    if law.has_compute_frontier and {"N", "D"} <= set(frame.columns):
        written.append(_frontier_plot(analysis, out_dir, plt, dpi))
        if analysis.summary.allocation and "C" in frame.columns:
            written.append(_isoflop_plot(analysis, out_dir, plt, dpi))
    elif len(law.inputs) == 1 and not law.curves:
        written.append(_one_input_plot(analysis, out_dir, plt, dpi))
    if law.curves:
        written.append(_curves_plot(analysis, out_dir, plt, dpi))
    return written


def _compute(frame) -> np.ndarray:
    if "C" in frame.columns and frame["C"].notna().all():
        return frame["C"].to_numpy(float)
    return 6.0 * frame["N"].to_numpy(float) * frame["D"].to_numpy(float)


def _residuals_plot(analysis, observed, predicted, held, out_dir, plt, dpi) -> str:
    frame = analysis.frame
    for column, words in (("C", "compute C (FLOPs)"), ("X", "X"), ("step", "step")):
        if column in frame.columns and frame[column].notna().all() and (frame[column] > 0).all():
            x_axis, xlabel, log = frame[column].to_numpy(float), words, column != "step"
            break
    else:
        x_axis, xlabel, log = np.arange(len(frame), dtype=float), "point", False
    relative = (observed - predicted) / np.abs(observed)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours = SizeColours(frame["N"]) if "N" in frame.columns and frame["N"].notna().all() else None
    point_colours = ([colours.colour(n) for n in frame["N"].to_numpy(float)] if colours is not None
                     else ["red" if h else "C0" for h in held])
    ax.scatter(x_axis[~held], relative[~held], s=14, c=[point_colours[i] for i in np.flatnonzero(~held)],
               label="fitted points")
    if held.any():
        ax.scatter(x_axis[held], relative[held], s=36, marker="x", c=[point_colours[i] for i in np.flatnonzero(held)],
                   label="held out (predicted)")
    ax.axhline(0, color="k", lw=1)
    if log:
        ax.set_xscale("log")
    from matplotlib.ticker import PercentFormatter

    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set(xlabel=xlabel, ylabel="(observed − fitted) / observed", title="relative residuals")
    handles = point_handles(held.any()) if colours is not None else point_handles(held.any(), "C0", "red")
    if colours is not None and colours.use_legend:
        handles += colours.handles(linestyle="")  # the sizes name the points' colours
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(handles=handles, fontsize=7)
        if colours is not None:
            colours.colorbar(fig, ax)
    return save(fig, out_dir / "residuals.png", plt, dpi)


def point_handles(held: bool, fitted_colour="0.5", held_colour="0.4") -> list:
    """Legend entries for the fitted and the held-out points (grey where their colours are the sizes')."""
    from matplotlib.lines import Line2D

    out = [Line2D([], [], color=fitted_colour, marker="o", ls="", ms=4, label="fitted points")]
    if held:
        out.append(Line2D([], [], color=held_colour, marker="x", ls="", ms=6, label="held out (predicted)"))
    return out


def _within(values: np.ndarray, fitted) -> np.ndarray:
    """True where `values` lie inside the range of the fitted column `fitted`."""
    fitted = np.asarray(fitted, float)
    return (values >= fitted.min() * (1 - 1e-6)) & (values <= fitted.max() * (1 + 1e-6))


def _entropy_line(ax, entropy: float | None) -> None:
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


def _frontier_plot(analysis, out_dir, plt, dpi) -> str:
    """Loss against compute: every point coloured by N, the fitted law along each sampled size,
    and the compute-optimal frontier, solid where its optimum lies among the fitted runs'
    sizes, token counts and compute, dashed beyond; the fitted compute range shaded."""
    from testbed.fit.laws import features
    from testbed.fit.protocols.allocation import optimal_allocation

    law, frame, result = analysis.law, analysis.frame, analysis.result
    compute = _compute(frame)
    held = frame["held_out"].to_numpy(bool)
    train = frame[~held]
    train_c = compute[~held]
    top = max(compute.max(), 10 * train_c.max(), *(analysis.summary.budgets or [0]))
    budgets = np.exp(np.linspace(np.log(compute.min()), np.log(top), 80))
    alloc = optimal_allocation(law, result.theta, budgets)
    sampled = _within(alloc["N_opt"], train["N"]) & _within(alloc["D_opt"], train["D"]) & _within(budgets, train_c)
    colours = SizeColours(frame["N"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axvspan(train_c.min(), train_c.max(), **FITTED_RANGE, label="compute range of the fitted runs")
    sizes = colours.sizes
    if len(sizes) <= 12:  # the law along each size: L(N, C / 6N) over that size's points
        for n in sizes:
            part = compute[frame["N"].to_numpy(float) == n]
            grid = np.exp(np.linspace(np.log(part.min()), np.log(part.max()), 40))
            if len(np.unique(part)) > 1:
                ax.plot(grid, law.predict_loss(result.theta, features(law, {"N": np.full_like(grid, n), "D": grid / (6 * n)})),
                        "-", color=colours.colour(n), lw=0.8, alpha=0.8)
    point_colours = [colours.colour(n) for n in frame["N"].to_numpy(float)]
    ax.scatter(compute[~held], frame["loss"].to_numpy(float)[~held], s=16, c=[point_colours[i] for i in np.flatnonzero(~held)],
               edgecolors="none", zorder=3)
    if held.any():
        ax.scatter(compute[held], frame["loss"].to_numpy(float)[held], s=36, marker="x",
                   c=[point_colours[i] for i in np.flatnonzero(held)], zorder=3)
    dashed_beyond(ax, budgets, alloc["loss"], sampled, "red", "compute-optimal frontier (fitted law)",
                  "frontier extrapolated (optimum outside the fitted runs)", lw=1.8)
    ax.set_xscale("log")
    _entropy_line(ax, (analysis.summary.entropy or {}).get("value"))
    ax.set(xlabel="compute C (FLOPs)", ylabel="validation loss",
           title=f"loss against compute, {law.name} law fitted")
    handles = ax.get_legend_handles_labels()[0] + point_handles(held.any())
    if colours.use_legend:
        ax.legend(handles=handles + colours.handles(), fontsize=7, loc="upper right")
    else:
        ax.legend(handles=handles, fontsize=7, loc="upper right")
        colours.colorbar(fig, ax)
    return save(fig, out_dir / "loss_vs_compute.png", plt, dpi)


def _isoflop_plot(analysis, out_dir, plt, dpi) -> str:
    """Per compute budget: its runs' losses against N, the fitted law along the budget (its
    minimum ★ where it lies among the budget's sizes) and the budget's parabola in log N
    (Approach 2; its vertex ▼ where the parabola opens upwards)."""
    from matplotlib.lines import Line2D

    from testbed.fit.laws import features
    from testbed.fit.protocols.allocation import optimal_allocation
    from testbed.fit.protocols.approaches import isoflop_groups

    law, frame, result = analysis.law, analysis.frame, analysis.result
    compute = _compute(frame)
    labels = isoflop_groups(compute)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    hidden, budget_handles = 0, []
    budgets = [lab for lab in np.unique(labels) if (labels == lab).sum() >= 3]
    palette = plt.get_cmap("plasma")(np.linspace(0.05, 0.8, max(len(budgets), 1)))
    for colour, label in zip(palette, budgets):
        group = frame[labels == label]
        n = group["N"].to_numpy(float)
        c = float(np.exp(np.log(compute[labels == label]).mean()))
        held = group["held_out"].to_numpy(bool)
        ax.scatter(n[~held], group["loss"].to_numpy(float)[~held], s=18, color=colour, zorder=3)
        if held.any():
            ax.scatter(n[held], group["loss"].to_numpy(float)[held], s=36, marker="x", color=colour, zorder=3)
        n_grid = np.exp(np.linspace(np.log(n.min()), np.log(n.max()), 60))
        fitted = law.predict_loss(result.theta, features(law, {"N": n_grid, "D": c / (6 * n_grid)}))
        ax.plot(n_grid, fitted, "-", color=colour, lw=1.2)
        if len(np.unique(n)) >= 3:
            c2, c1, c0 = np.polyfit(np.log(n), group["loss"].to_numpy(float), 2)
            ax.plot(n_grid, c0 + c1 * np.log(n_grid) + c2 * np.log(n_grid) ** 2, ":", color=colour, lw=1)
            vertex = -c1 / (2 * c2) if c2 > 0 else np.nan
            if np.isfinite(vertex) and np.log(n.min()) <= vertex <= np.log(n.max()):
                ax.plot(np.exp(vertex), c0 + c1 * vertex + c2 * vertex**2, "v", color=colour, ms=7, mec="k", mew=0.5)
        best = optimal_allocation(law, result.theta, [c])
        if _within(best["N_opt"], n).all():
            ax.plot(best["N_opt"], best["loss"], "*", color=colour, ms=12, mec="k", mew=0.6, zorder=4)
        else:  # a minimum beyond the budget's sizes is not drawn where no run was trained
            hidden += 1
        budget_handles.append(Line2D([], [], color=colour, marker="o", ms=4, label=f"C = {_budget(c)} FLOPs"))
    styles = [Line2D([], [], color="k", lw=1.2, label=f"{law.name} law"),
              Line2D([], [], color="k", ls=":", lw=1, label="parabola in log N"),
              Line2D([], [], color="0.6", marker="*", ms=10, mec="k", ls="", label="law minimum"),
              Line2D([], [], color="0.6", marker="v", ms=7, mec="k", ls="", label="parabola minimum")]
    title = "IsoFLOP curves"
    if hidden:
        title += f" ({hidden} law minima outside the sampled sizes, not drawn)"
    ax.set_xscale("log")
    count_axis(ax.xaxis)
    ax.set(xlabel="parameters N", ylabel="validation loss", title=title)
    first = ax.legend(handles=budget_handles, fontsize=7, title="compute budget", title_fontsize=7,
                      loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.add_artist(first)
    ax.legend(handles=styles, fontsize=7, loc="lower left", bbox_to_anchor=(1.01, 0.0))
    return save(fig, out_dir / "isoflop.png", plt, dpi)


def _budget(c: float) -> str:
    return tick_label(float(f"{c:.2g}"))


def _one_input_plot(analysis, out_dir, plt, dpi) -> str:
    """A one-input law (power: L = E + A/X^α): the points and the law, dashed beyond the fitted X."""
    from testbed.fit.laws import features

    law, frame, result = analysis.law, analysis.frame, analysis.result
    name = law.inputs[0]
    x = frame[name].to_numpy(float)
    held = frame["held_out"].to_numpy(bool)
    fitted_x = x[~held]
    top = max(x.max(), 10 * fitted_x.max())
    grid = np.exp(np.linspace(np.log(x.min()), np.log(top), 80))
    curve = law.predict_loss(result.theta, features(law, {name: grid}))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axvspan(fitted_x.min(), fitted_x.max(), **FITTED_RANGE, label=f"{name} range of the fitted points")
    ax.scatter(x[~held], frame["loss"].to_numpy(float)[~held], s=14, color="C0", zorder=3, label="fitted points")
    if held.any():
        ax.scatter(x[held], frame["loss"].to_numpy(float)[held], s=30, marker="x", color="red", zorder=3, label="held out")
    dashed_beyond(ax, grid, curve, _within(grid, fitted_x), "k", f"{law.name} law", "extrapolated")
    ax.set_xscale("log")
    _entropy_line(ax, (analysis.summary.entropy or {}).get("value"))
    ax.set(xlabel=name, ylabel="loss", title=f"loss against {name}, {law.name} law fitted")
    ax.legend(fontsize=7)
    return save(fig, out_dir / "law.png", plt, dpi)


def _curves_plot(analysis, out_dir, plt, dpi) -> str:
    """Curve laws: each run's points and the law's curve, solid over the rows it was fitted to
    and dashed over held-out rows (predicted, never fitted)."""
    from matplotlib.lines import Line2D

    from testbed.fit.laws import law_inputs

    law, frame, result = analysis.law, analysis.frame, analysis.result
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run_id, part in frame.groupby("run_id"):
        part = part.sort_values("step")
        line = ax.plot(part["step"], part["loss"], ".", ms=2, alpha=0.35, label=f"{run_id}")[0]
        for drawn in dashed_beyond(ax, part["step"], result.predict(law_inputs(law, part)),
                                   ~part["held_out"].to_numpy(bool), line.get_color(), None, None, lw=1.6):
            drawn.set_zorder(3)
    # The first steps' loss is far above the rest; a log scale keeps the late curve readable.
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=f"loss curves and the {law.name} fit")
    # The points' legend entries as opaque proxies (the plotted points are faint and small).
    handles = [Line2D([], [], color=h.get_color(), marker="o", ls="", ms=4, label=h.get_label())
               for h in ax.get_legend_handles_labels()[0]]
    styles = [Line2D([], [], color="k", lw=1.6, label="law, fitted rows"),
              Line2D([], [], color="k", ls="--", lw=1.6, label="law, held-out rows (predicted)")]
    ax.legend(handles=handles + styles, fontsize=7)
    return save(fig, out_dir / "loss_curves.png", plt, dpi)


def _comparison_plot(analysis, out_dir, plt, dpi) -> list[str]:
    from testbed.fit.protocols.allocation import optimal_allocation

    frame = analysis.frame
    compute = _compute(frame)
    held = frame["held_out"].to_numpy(bool)
    train_c = compute[~held]
    budgets = np.exp(np.linspace(np.log(compute.min()), np.log(max(analysis.summary.budgets or [0.0])), 60))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.axvspan(train_c.min(), train_c.max(), **FITTED_RANGE, label="compute range of the fitted runs")
    by = analysis.options.by
    inside = _within(budgets, train_c)
    for value, result in analysis.groups.items():
        part = frame[frame[by].astype(str) == value]
        points = ax.scatter(_compute(part), part["loss"], s=10, label=f"{value}")
        dashed_beyond(ax, budgets, optimal_allocation(analysis.law, result.theta, budgets)["loss"], inside,
                      points.get_facecolor()[0], None, None, lw=1.2)
    ax.plot([], [], "k--", lw=1, label="extrapolated")
    ax.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="loss", title=f"compute-optimal frontiers by {by}")
    ax.legend(fontsize=7)
    return [save(fig, out_dir / "frontiers_by_variant.png", plt, dpi)]


# ----------------------------------------------------------------------------- LR sensitivity

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
