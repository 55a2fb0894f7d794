"""The plots a researcher reads: each is a PNG with the artists it promises (legends, the dashed
extrapolation, one line per run, tick labels that do not run into each other). Fake run
directories from a known law, so nothing is trained here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import testbed.fit.reporting.curves_plot as curves_plot
import testbed.fit.reporting.lr_plots as lr_plots
import testbed.fit.reporting.plots as plots
import testbed.fit.reporting.style as style
from testbed.cli import main

LAW = {"A": 400.0, "B": 1500.0, "E": 1.8, "alpha": 0.34, "beta": 0.36}
PNG = b"\x89PNG\r\n\x1a\n"


def law_loss(n, d):
    return LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]


def write_run(root: Path, run_id: str, n: float, tokens: int, rng, steps: int = 40) -> Path:
    """A finished run of N parameters and `tokens` tokens: an index with three evaluated
    checkpoints and a metrics log with a training loss every step, in the trainer's fields."""
    run = root / "runs" / run_id
    (run / "checkpoints").mkdir(parents=True)
    batch = tokens // steps
    (run / "run.json").write_text(json.dumps({
        "run_id": run_id, "labels": {"size": f"{n:.0e}"}, "n_params": n, "n_params_non_embedding": 0.9 * n,
        "n_params_embedding": 0.1 * n, "vocab_size": 512, "d_model": 64, "n_layers": 4, "global_batch_tokens": batch,
        "planned_steps": steps, "planned_tokens": tokens, "planned_flops": 6 * n * tokens, "flops_per_token": 6 * n,
        "unique_tokens": None, "epochs": 1.0, "schedule": "cosine", "peak_lr": 1e-3, "data_entropy": 1.7,
        "parent": None}))
    index, metrics = [], []
    for step in range(1, steps + 1):
        d = step * batch
        loss = law_loss(n, d) * np.exp(0.002 * rng.standard_normal())
        metrics.append({"step": step, "tokens": d, "flops": 6 * n * d, "lr": 1e-3, "train_loss": loss + 0.01})
        if step in (steps // 8, steps // 2, steps):
            metrics.append({"step": step, "tokens": d, "flops": 6 * n * d, "lr": 1e-3, "val_loss": loss})
            index.append({"step": step, "tokens": d, "flops": 6 * n * d, "val_loss": loss, "val_bpb": loss / np.log(2),
                          "kind": "final" if step == steps else "science", "path": f"checkpoints/step_{step:08d}",
                          "lr": 1e-3, "phase": "decay"})
    (run / "checkpoints" / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return run


def isoflop_sweep(root: Path, budgets=(3e16, 7e16, 1.6e17, 3.8e17)) -> Path:
    """Four budgets across one decade (a range whose minor tick labels used to smear), four
    sizes each, bracketing the optimum."""
    rng = np.random.default_rng(0)
    for i, budget in enumerate(budgets):
        n_opt = 0.6 * (budget / 6) ** 0.5
        for j, n in enumerate(n_opt * np.array([0.25, 0.6, 1.6, 4.0])):
            write_run(root, f"c{i}-n{j}", float(n), int(budget / (6 * n)), rng)
    return root


def ladder_sweep(root: Path) -> Path:
    """An ordinary sweep: four sizes x three durations (not IsoFLOP-shaped)."""
    rng = np.random.default_rng(1)
    for i, n in enumerate((2e6, 5e6, 1.2e7, 3e7)):
        for j, ratio in enumerate((5, 10, 20)):
            write_run(root, f"n{i}-d{j}", n, int(ratio * n), rng)
    return root


# ----------------------------------------------------------------------------- what each figure holds

def describe(fig) -> dict:
    """The artists of a figure, laid out as saved: per axes its lines, legends, shaded spans and
    the drawn boxes of its x tick labels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        legends = [c for c in ax.get_children() if type(c).__name__ == "Legend"]
        low, high = sorted(ax.get_xlim())
        ticks = ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks()  # minor labels too: they smeared
        labels = [t.label1 for t in ticks if t.label1.get_visible() and t.label1.get_text()
                  and low <= t.get_loc() <= high]
        out.append({
            "lines": [{"style": line.get_linestyle(), "marker": line.get_marker(), "n": len(line.get_xdata()),
                       "label": line.get_label(), "face": line.get_markerfacecolor()} for line in ax.get_lines()],
            "legends": [[t.get_text() for t in legend.get_texts()] for legend in legends],
            "spans": [p.get_label() for p in ax.patches],
            "xticks": [(t.get_text(), t.get_window_extent(renderer)) for t in labels],
            "xscale": ax.get_xscale(), "title": ax.get_title(), "ylabel": ax.get_ylabel(),
        })
    return {"axes": out, "legends": [[t.get_text() for t in legend.get_texts()] for legend in fig.legends]}


@pytest.fixture
def drawn(monkeypatch):
    """Every figure the plot code saves, described just before it is written: {file name: description}."""
    seen: dict[str, dict] = {}
    real = style.save

    def spy(fig, path, plt=None, dpi=style.DPI, rect=None):
        for ax in fig.axes:
            style.tidy_log_axes(ax)
        fig.tight_layout(rect=rect)
        seen[Path(path).name] = describe(fig)
        return real(fig, path, plt, dpi, rect)

    for module in (plots, curves_plot, lr_plots):  # each draws through its own binding of save
        monkeypatch.setattr(module, "save", spy)
    return seen


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def no_overlap(ticks) -> bool:
    boxes = sorted((box for _, box in ticks), key=lambda b: b.x0)
    return all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:]))


def lines_of(axes: dict, style: str) -> list[dict]:
    return [line for line in axes["lines"] if line["style"] == style and line["n"] > 1]


# ----------------------------------------------------------------------------- log ticks

@pytest.mark.parametrize("low, high", [(6.5e10, 3.1e11), (1.8e17, 6.6e17), (1e3, 1e9), (1.8, 2.6),
                                       (1e-3, 0.1), (2.1e-4, 3e4), (7.1e10, 7.9e10)])
def test_log_ticks_are_few_and_inside_the_range(low, high):
    ticks = style.log_ticks(low, high)
    assert 2 <= len(ticks) <= 6, ticks
    assert all(low * (1 - 1e-9) <= t <= high * (1 + 1e-9) for t in ticks)
    assert ticks == sorted(ticks)


def test_tick_labels_are_short():
    assert [style.tick_label(v) for v in (2.0, 0.003, 3e4, 1e11, 2e17)] == \
        ["2", "0.003", "30000", "$10^{11}$", "$2{\\times}10^{17}$"]


# ----------------------------------------------------------------------------- testbed fit

def test_fit_of_an_isoflop_sweep_draws_frontier_isoflop_and_readable_residuals(tmp_path, drawn):
    sweep = isoflop_sweep(tmp_path / "sweep")
    out = tmp_path / "fit"
    assert main(["fit", str(sweep), "--holdout", "largest", "--quiet", "--out", str(out)]) == 0
    names = ["observed_vs_fitted.png", "residuals.png", "loss_vs_compute.png", "isoflop.png"]
    assert json.loads((out / "fit.json").read_text())["plots"] == names
    assert all(is_png(out / name) for name in names)

    residuals = drawn["residuals.png"]["axes"][0]
    assert residuals["xscale"] == "log" and 2 <= len(residuals["xticks"]) <= 6
    assert no_overlap(residuals["xticks"]), [t for t, _ in residuals["xticks"]]
    assert "held out (predicted)" in residuals["legends"][0]
    colorbar = drawn["residuals.png"]["axes"][1]  # 16 sizes: a colorbar names the colours
    assert colorbar["ylabel"] == "parameters N"

    frontier = drawn["loss_vs_compute.png"]["axes"][0]
    texts = frontier["legends"][0]
    assert "compute-optimal frontier (fitted law)" in texts
    assert "frontier extrapolated (optimum outside the fitted runs)" in texts
    assert drawn["loss_vs_compute.png"]["axes"][1]["ylabel"] == "parameters N"
    assert lines_of(frontier, "--") and "compute range of the fitted runs" in frontier["spans"]
    assert no_overlap(frontier["xticks"])

    isoflop = drawn["isoflop.png"]["axes"][0]
    budgets, styles = isoflop["legends"]
    assert len(budgets) == 4 and all(t.startswith("C = ") and t.endswith("FLOPs") for t in budgets)
    assert "parabola in log N" in styles
    assert len(lines_of(isoflop, ":")) == 4 and len(lines_of(isoflop, "-")) == 4  # a parabola and the law per budget
    assert sum(line["marker"] == "*" for line in isoflop["lines"]) >= 1


def test_fit_of_an_ordinary_sweep_draws_its_frontier(tmp_path, drawn, capsys):
    sweep = ladder_sweep(tmp_path / "sweep")
    out = tmp_path / "fit"
    assert main(["fit", str(sweep), "--quiet", "--out", str(out)]) == 0
    saved = json.loads((out / "fit.json").read_text())
    assert "allocation_skipped" in saved  # not IsoFLOP-shaped: no allocation, no isoflop plot...
    assert saved["plots"] == ["observed_vs_fitted.png", "residuals.png", "loss_vs_compute.png"]  # ...but a frontier
    frontier = drawn["loss_vs_compute.png"]["axes"][0]
    assert lines_of(frontier, "--") and lines_of(frontier, "-")
    assert [t for t in frontier["legends"][0] if t.startswith("N = ")] == ["N = 2M", "N = 5M", "N = 12M", "N = 30M"]
    # The law along each of the four sizes, and the frontier.
    assert len([line for line in lines_of(frontier, "-") if line["label"].startswith("_")]) >= 4
    assert "![loss_vs_compute](loss_vs_compute.png)" in (out / "report.md").read_text()


def test_a_one_input_law_is_drawn_dashed_beyond_its_fitted_range(tmp_path, drawn):
    x = np.logspace(8, 11, 12)
    table = pd.DataFrame({"run_id": [f"r{i}" for i in range(12)], "X": x, "loss": 2.0 + 30 * x ** -0.2})
    table.to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "fit"
    assert main(["fit", str(tmp_path / "t.csv"), "--law", "power", "--holdout", "X>3e10", "--quiet",
                 "--out", str(out)]) == 0
    assert is_png(out / "law.png")
    law = drawn["law.png"]["axes"][0]
    assert lines_of(law, "--") and lines_of(law, "-") and "extrapolated" in law["legends"][0]
    assert "held out" in law["legends"][0] and law["spans"] == ["X range of the fitted points"]


# ----------------------------------------------------------------------------- testbed plot

def test_plot_of_a_sweep_draws_every_run_coloured_by_size(tmp_path, drawn, capsys):
    sweep = ladder_sweep(tmp_path / "sweep")
    out = tmp_path / "curves"
    assert main(["plot", str(sweep), "--out", str(out)]) == 0
    assert "loss_vs_tokens.png" in capsys.readouterr().out
    for name, xlabel_word in (("loss_vs_tokens.png", "tokens"), ("loss_vs_flops.png", "FLOPs")):
        assert is_png(out / name)
        ax = drawn[name]["axes"][0]
        assert ax["xscale"] == "log" and no_overlap(ax["xticks"])
        runs = [line for line in lines_of(ax, "-") if line["label"].startswith("_")]
        assert len(runs) == 12  # one training curve per run
        markers = [line for line in ax["lines"] if line["marker"] == "o" and line["label"].startswith("_")]
        assert len(markers) == 12  # and its validation points
        texts = ax["legends"][0]
        assert [t for t in texts if t.startswith("N = ")] == ["N = 2M", "N = 5M", "N = 12M", "N = 30M"]
        assert any(t.startswith("training loss") for t in texts) and "validation loss" in texts
        assert "12 runs" in ax["title"]


def test_plot_of_a_run_writes_under_the_run_by_default(tmp_path, drawn):
    run = write_run(tmp_path, "one", 5e6, int(5e7), np.random.default_rng(2))
    assert main(["plot", str(run)]) == 0
    assert is_png(run / "plots" / "loss_vs_tokens.png") and is_png(run / "plots" / "loss_vs_flops.png")
    ax = drawn["loss_vs_tokens.png"]["axes"][0]
    assert len(lines_of(ax, "-")) == 2  # the raw training loss, faint, and its smoothed line
    assert "one" in ax["title"] and "N = 5M" in ax["title"]


def test_plot_of_nothing_is_one_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no run.json" in capsys.readouterr().err


def test_smoothing_keeps_a_steep_start_and_averages_a_flat_end():
    step = np.arange(1, 1001, dtype=float)
    loss = 1 / np.sqrt(step) + np.where(step % 2 == 0, 0.01, -0.01)
    smooth = curves_plot.smooth(step, loss)
    assert smooth[0] == loss[0]  # the window of step 1 holds step 1 alone
    assert np.abs(smooth[500:] - 1 / np.sqrt(step[500:])).max() < 2e-3  # the alternation averages out


# ----------------------------------------------------------------------------- LR sensitivity

def lr_batch_table() -> pd.DataFrame:
    rows = []
    for n, d in ((1e6, 2e7), (3e6, 6e7), (1e7, 2e8)):
        best = 0.3 * n ** -0.4
        for lr in (3e-4, 1e-3, 3e-3, 1e-2):
            for batch in (256, 512):
                rows.append({"N": n, "D": d, "lr": lr, "batch": batch,
                             "loss": 2 + 40 * n ** -0.3 + 0.05 * np.log(lr / best) ** 2 + 1e-4 * batch / 256})
    return pd.DataFrame(rows)


def test_fit_hparams_draws_loss_against_lr_per_size_with_the_rule_marked(tmp_path, drawn, capsys):
    lr_batch_table().to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "hp"
    assert main(["fit", "hparams", str(tmp_path / "t.csv"), "--out", str(out)]) == 0
    assert "lr_sensitivity.png" in capsys.readouterr().out and is_png(out / "lr_sensitivity.png")
    figure = drawn["lr_sensitivity.png"]
    ax = figure["axes"][0]
    curves = [line for line in ax["lines"] if line["marker"] == "o"]
    assert len(curves) == 3 and all(line["n"] == 4 for line in curves)  # one line per (N, D), four LRs
    assert sum(line["marker"] in ("*", ">", "<") for line in ax["lines"]) == 3  # each cell's lr_opt
    assert ax["legends"][0] == ["N = 1M, D = 20M", "N = 3M, D = 60M", "N = 10M, D = 200M"]
    assert figure["legends"][0][0].startswith("lr_opt of the fitted rule")
    assert ax["xscale"] == "log" and no_overlap(ax["xticks"])
    # --no-plots writes the JSON alone.
    assert main(["fit", "hparams", str(tmp_path / "t.csv"), "--no-plots", "--out", str(tmp_path / "bare")]) == 0
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["hparams.json"]


def test_lr_sensitivity_marks_a_choice_at_the_edge_and_beyond_the_grid(tmp_path, drawn):
    lr = np.array([1e-3, 3e-3, 1e-2])
    curves = [lr_plots.LrCurve("inside", lr, np.array([2.2, 2.0, 2.1]), chosen=3e-3, size=1e6),
              lr_plots.LrCurve("edge", lr, np.array([2.3, 2.2, 2.1]), chosen=1e-2, size=2e6),
              lr_plots.LrCurve("beyond", lr, np.array([2.5, 2.4, 2.3]), chosen=5e-2, size=4e6)]
    lr_plots.lr_sensitivity(curves, tmp_path / "lr.png", "test")
    assert is_png(tmp_path / "lr.png")
    figure = drawn["lr.png"]
    marks = {line["marker"]: line["face"] for line in figure["axes"][0]["lines"] if line["marker"] in ("*", ">")}
    assert marks[">"] == "white" and set(figure["legends"][0]) == {
        "chosen LR", "chosen LR, at its grid's edge", "chosen LR beyond the grid (arrow at the edge)"}
    stars = [line["face"] for line in figure["axes"][0]["lines"] if line["marker"] == "*"]
    assert "white" in stars and len(stars) == 2


def test_a_study_draws_the_lr_it_chose_per_cell(tmp_path, drawn):
    from testbed.stats.choice import choose_lr
    from testbed.study.base import Context, lr_plot

    rows = []
    for arm in ("pre", "post"):
        for budget in (1e12, 1e13):
            for lr in (1e-3, 3e-3, 1e-2):
                for seed in (0, 1):
                    rows.append({"label_arm": arm, "label_budget": budget, "peak_lr": lr, "label_seed": seed,
                                 "N": 1e6 if budget == 1e12 else 3e6,
                                 "loss": 2 + abs(np.log10(lr) + 2.5) * 0.1 + 0.01 * seed + (arm == "post") * 0.02
                                 - 0.1 * (budget == 1e13)})
    frame = pd.DataFrame(rows)
    choice = choose_lr(frame, ["label_arm", "label_budget"], seed="label_seed")
    ctx = Context(out=tmp_path, size="tiny", sweep_dirs={})
    assert lr_plot(ctx, frame, choice) == ["lr_sensitivity.png"] and is_png(tmp_path / "lr_sensitivity.png")
    figure = drawn["lr_sensitivity.png"]
    assert [ax["title"] for ax in figure["axes"]] == ["arm post", "arm pre"]  # a panel per arm
    for ax in figure["axes"]:
        assert ax["legends"][0] == ["budget 1e+12", "budget 1e+13"]
        assert sum(line["marker"] == "*" for line in ax["lines"]) == 2
    # One LR per cell: nothing to draw.
    one = frame[frame["peak_lr"] == 3e-3]
    assert lr_plot(ctx, one, choose_lr(one, ["label_arm", "label_budget"], seed="label_seed"), "one.png") == []
    assert not (tmp_path / "one.png").exists()
