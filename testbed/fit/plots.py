"""PNG plots of a fit (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, plt) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_plots(analysis, out_dir: Path) -> list[str]:
    from testbed.fit.laws import law_inputs

    plt = _pyplot()
    law, frame, result = analysis.law, analysis.frame, analysis.result
    written: list[str] = []
    if analysis.groups:
        return written + _comparison_plot(analysis, out_dir, plt)
    observed = frame["loss"].to_numpy(float)
    predicted = result.predict(law_inputs(law, frame))
    held = frame["held_out"].to_numpy(bool)

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(observed[~held], predicted[~held], s=10, label="fitted")
    if held.any():
        ax.scatter(observed[held], predicted[held], s=25, marker="x", color="red", label="held out")
    lims = [min(observed.min(), predicted.min()), max(observed.max(), predicted.max())]
    ax.plot(lims, lims, "k--", lw=1)
    ax.set(xlabel="observed loss", ylabel="fitted loss", title=f"{law.name}: observed vs fitted")
    ax.legend()
    written.append(_save(fig, out_dir / "observed_vs_fitted.png", plt))

    fig, ax = plt.subplots(figsize=(6, 4))
    x_axis = frame["C"].to_numpy(float) if "C" in frame else np.arange(len(frame))
    ax.scatter(x_axis, (observed - predicted) / np.abs(observed), s=10, c=np.where(held, "red", "C0"))
    ax.axhline(0, color="k", lw=1)
    if "C" in frame:
        ax.set_xscale("log")
    ax.set(xlabel="compute C" if "C" in frame else "point", ylabel="relative residual", title="residuals")
    written.append(_save(fig, out_dir / "residuals.png", plt))

    if law.has_compute_frontier and analysis.summary.get("allocation") and {"N", "D", "C"} <= set(frame.columns):
        written += _frontier_plots(analysis, out_dir, plt)
    if law.curves:
        written.append(_curves_plot(analysis, out_dir, plt))
    return written


def _within(values: np.ndarray, fitted) -> np.ndarray:
    """True where `values` lie inside the range of the fitted column `fitted`."""
    fitted = np.asarray(fitted, float)
    return (values >= fitted.min() * (1 - 1e-6)) & (values <= fitted.max() * (1 + 1e-6))


def _frontier_plots(analysis, out_dir, plt) -> list[str]:
    from testbed.fit.allocation import optimal_allocation
    from testbed.fit.approaches import isoflop_groups
    from testbed.fit.laws import features

    law, frame, result = analysis.law, analysis.frame, analysis.result
    train = frame[~frame["held_out"]]
    compute = frame["C"].to_numpy(float)
    budgets = np.exp(np.linspace(np.log(compute.min()), np.log(max(compute.max(), *analysis.summary.get("budgets", [0]))), 60))
    alloc = optimal_allocation(law, result.theta, budgets)
    # Solid where the optimum lies among the fitted runs' sizes and token counts, dashed beyond.
    sampled = _within(alloc["N_opt"], train["N"]) & _within(alloc["D_opt"], train["D"]) & _within(budgets, train["C"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(compute, frame["loss"], s=10, c=np.log10(frame["N"]), cmap="viridis")
    if sampled.any():
        ax.plot(np.where(sampled, budgets, np.nan), alloc["loss"], "r-", label="fitted compute-optimal frontier")
    ax.plot(np.where(sampled, np.nan, budgets), alloc["loss"], "r--", lw=1,
            label="frontier outside the sampled sizes (extrapolated)")
    entropy = analysis.summary.get("entropy", {}).get("value")
    if entropy is not None:
        ax.axhline(entropy, color="k", ls=":", lw=1, label="data entropy")
    ax.set(xscale="log", xlabel="compute C = 6ND", ylabel="loss", title="loss against compute")
    ax.legend(fontsize=7)
    paths = [_save(fig, out_dir / "loss_vs_compute.png", plt)]

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = isoflop_groups(compute)
    hidden = 0
    for label in np.unique(labels):
        group = frame[labels == label]
        if len(group) < 3:
            continue
        c = float(np.exp(np.log(group["C"]).mean()))
        line = ax.scatter(group["N"], group["loss"], s=10)
        n_grid = np.exp(np.linspace(np.log(group["N"].min()), np.log(group["N"].max()), 50))
        fitted = law.predict_loss(result.theta, features(law, {"N": n_grid, "D": c / (6 * n_grid)}))
        ax.plot(n_grid, fitted, color=line.get_facecolor()[0], lw=1)
        best = optimal_allocation(law, result.theta, [c])
        if _within(best["N_opt"], group["N"]).all():
            ax.plot(best["N_opt"], best["loss"], "k*", ms=8)
        else:  # a minimum beyond the budget's sizes is not drawn where no run was trained
            hidden += 1
    title = "IsoFLOP curves (fitted law, minima ★)"
    if hidden:
        title += f"\n{hidden} minima outside the sampled sizes, not drawn"
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss", title=title)
    paths.append(_save(fig, out_dir / "isoflop.png", plt))
    return paths


def _curves_plot(analysis, out_dir, plt) -> str:
    from testbed.fit.laws import law_inputs

    law, frame, result = analysis.law, analysis.frame, analysis.result
    fig, ax = plt.subplots(figsize=(6, 4))
    for run_id, part in frame.groupby("run_id"):
        part = part.sort_values("step")
        line = ax.plot(part["step"], part["loss"], ".", ms=2, label=f"{run_id}")[0]
        ax.plot(part["step"], result.predict(law_inputs(law, part)), "-", color=line.get_color(), lw=1)
    # The first steps' loss is far above the rest; a log scale keeps the late curve readable.
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=f"loss curves and the {law.name} fit")
    ax.legend(fontsize=7)
    return _save(fig, out_dir / "loss_curves.png", plt)


def _comparison_plot(analysis, out_dir, plt) -> list[str]:
    from testbed.fit.allocation import optimal_allocation

    frame = analysis.frame
    compute = frame["C"].to_numpy(float)
    budgets = np.exp(np.linspace(np.log(compute.min()), np.log(max(analysis.summary["budgets"])), 60))
    fig, ax = plt.subplots(figsize=(6, 4))
    by = analysis.options.by
    for value, result in analysis.groups.items():
        part = frame[frame[by].astype(str) == value]
        points = ax.scatter(part["C"], part["loss"], s=8, label=f"{value}")
        ax.plot(budgets, optimal_allocation(analysis.law, result.theta, budgets)["loss"],
                color=points.get_facecolor()[0], lw=1)
    ax.set(xscale="log", xlabel="compute C", ylabel="loss", title=f"compute-optimal frontiers by {by}")
    ax.legend(fontsize=7)
    return [_save(fig, out_dir / "frontiers_by_variant.png", plt)]
