"""PNG plots of a fit: observed against fitted, residuals, loss against compute with the
compute-optimal frontier, IsoFLOP profiles, a one-input law, loss curves and variants' frontiers
(conventions: testbed.fit.reporting.style)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from testbed.fit.reporting.style import (
    DPI,
    FITTED_RANGE,
    SizeColours,
    count_axis,
    dashed_beyond,
    entropy_line,
    pyplot,
    save,
    tick_label,
)

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
    entropy_line(ax, (analysis.summary.entropy or {}).get("value"))
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
    entropy_line(ax, (analysis.summary.entropy or {}).get("value"))
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
