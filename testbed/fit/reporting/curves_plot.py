"""Loss curves of a run or of every run of a sweep: loss against tokens and against FLOPs
(`testbed plot RUN_OR_SWEEP`).

Reads each run's metrics.jsonl and run.json through testbed/rundir.py. The training loss of the
logged steps is a line, the validation loss of the evaluations a marker on it; the runs of a
sweep are coloured by model size (a legend, or a colorbar for more than eight sizes). A cooldown
branch is drawn from its branch step on (its earlier lines are its parent's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from testbed.fit.reporting.style import DPI, SizeColours, count_axis, entropy_line, pyplot, save, short

AXES = (("tokens", "tokens seen D", "loss_vs_tokens.png"), ("flops", "compute C (FLOPs)", "loss_vs_flops.png"))


@dataclass
class Curve:
    run_id: str
    n_params: float | None
    entropy: float | None
    train: dict[str, np.ndarray]  # step, tokens, flops, loss
    val: dict[str, np.ndarray]


def _series(lines: list[dict], key: str, batch: float | None, per_token: float | None) -> dict[str, np.ndarray]:
    rows = sorted((x for x in lines if isinstance(x.get(key), (int, float)) and np.isfinite(x[key])),
                  key=lambda x: float(x.get("step", 0)))
    step = np.array([float(x.get("step", 0)) for x in rows])
    tokens = np.array([float(x["tokens"]) if x.get("tokens") is not None else step[i] * (batch or np.nan)
                       for i, x in enumerate(rows)])
    flops = np.array([float(x["flops"]) if x.get("flops") is not None else tokens[i] * (per_token or np.nan)
                      for i, x in enumerate(rows)])
    return {"step": step, "tokens": tokens, "flops": flops, "loss": np.array([float(x[key]) for x in rows])}


SMOOTH = 0.15  # the training loss is averaged over the logged steps within ±15% of each step


def smooth(step: np.ndarray, loss: np.ndarray, width: float = SMOOTH) -> np.ndarray:
    """The mean of the losses logged within [step / (1 + width), step * (1 + width)] of each
    step: a window constant on a log axis, so the steep first steps keep their shape while the
    noise of the late, flat part (small batches) averages out."""
    if len(loss) < 3:
        return loss
    total = np.concatenate([[0.0], np.cumsum(loss)])
    low = np.searchsorted(step, step / (1 + width), side="left")
    high = np.searchsorted(step, step * (1 + width), side="right")
    return (total[high] - total[low]) / (high - low)


def read_curves(root: str | Path) -> list[Curve]:
    """The training and validation curves of every run under `root` (a run directory, a sweep
    directory or a folder of runs; branches included)."""
    from testbed.errors import TestbedError
    from testbed.rundir import find_runs

    runs = find_runs(root)
    if not runs:
        raise TestbedError(f"no run.json found under {str(root)!r}; pass a run directory, a sweep directory "
                           f"or a folder of run directories")
    curves = []
    for rd in runs:
        run = rd.read_run() or {}
        parent = run.get("parent")
        after = int(parent.get("step") or 0) if isinstance(parent, dict) else 0
        lines = [x for x in rd.metrics() if int(x.get("step", 0)) > after or not after]
        batch, per_token = run.get("global_batch_tokens"), run.get("flops_per_token")
        curves.append(Curve(str(run.get("run_id") or rd.path.name), run.get("n_params"), run.get("data_entropy"),
                            _series(lines, "train_loss", batch, per_token), _series(lines, "val_loss", batch, per_token)))
    if not any(len(c.train["loss"]) or len(c.val["loss"]) for c in curves):
        raise TestbedError(f"no run under {str(root)!r} has logged a loss yet (metrics.jsonl); train first, "
                           f"or pass a run or sweep directory that has")
    return curves


def plot_curves(root: str | Path, out_dir: str | Path, dpi: int = DPI) -> list[str]:
    """Write loss_vs_tokens.png and loss_vs_flops.png for the runs under `root`."""
    from matplotlib.lines import Line2D

    curves = read_curves(root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    single = len(curves) == 1
    sizes = SizeColours([c.n_params for c in curves if c.n_params])
    entropies = {round(float(c.entropy), 9) for c in curves if c.entropy is not None}
    entropy = entropies.pop() if len(entropies) == 1 else None  # one language: its floor
    written = []
    for key, xlabel, name in AXES:
        fig, ax = plt.subplots(figsize=(7 if single else 8.5, 4.5))
        for curve in curves:
            colour = "C0" if single else sizes.colour(curve.n_params or np.nan)
            train, val = curve.train, curve.val
            keep = np.isfinite(train[key]) & (train[key] > 0)
            if single:  # the raw training loss, faint, under its smoothed line
                ax.plot(train[key][keep], train["loss"][keep], "-", color=colour, lw=0.6, alpha=0.3)
            ax.plot(train[key][keep], smooth(train["step"][keep], train["loss"][keep]), "-", color=colour, lw=1.3)
            keep = np.isfinite(val[key]) & (val[key] > 0)
            ax.plot(val[key][keep], val["loss"][keep], "o", color=colour, ms=4, mec="k", mew=0.4, zorder=3)
        ax.set_xscale("log")
        if key == "tokens":
            count_axis(ax.xaxis)
        entropy_line(ax, entropy)
        styles = [Line2D([], [], color="k", lw=1.3, label=f"training loss\n(mean within ±{SMOOTH:.0%} of the step)"),
                  Line2D([], [], color="k", marker="o", ls="", ms=4, mfc="0.6", mec="k", mew=0.4,
                         label="validation loss")]
        handles, _ = ax.get_legend_handles_labels()
        if single:
            title = f"{curves[0].run_id}" + (f" (N = {short(curves[0].n_params)})" if curves[0].n_params else "")
        else:
            title = f"{len(curves)} runs of {Path(root).name}"
            if sizes.use_legend:
                styles += sizes.handles(marker="", linestyle="-")
        if single:
            ax.legend(handles=handles + styles, fontsize=7, loc="upper right")
        else:  # beside the axes: the curves of a sweep fill them
            ax.legend(handles=handles + styles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        if not single and not sizes.use_legend:
            sizes.colorbar(fig, ax)
        ax.set(xlabel=xlabel, ylabel="loss (nats/token)", title=title)
        written.append(save(fig, out / name, plt, dpi))
    return written
