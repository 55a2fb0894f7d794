"""What a study is: the `Study` record, the `STUDIES` registry and the statistics studies share.

A study declares its paper and claim, its sweeps per size (plain sweep mappings, the same
language as a sweep file), an optional `extra` step run after the sweeps (cooldown branches),
an `analyse` function over the collected points and a `verdict` function over what it measured.
Verdicts are reported as found: the thresholds are fixed in the study's code, before any run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from testbed.registry import Registry
from testbed.stats import Estimate
from testbed.stats.choice import LrChoice, choose_lr

SIZES = ("tiny", "cpu", "gpu", "gpu-min")
# gpu-min (8 minutes of one GPU, recipes.py) is defined by the studies that size their sweeps for
# it (`sizes=SIZES`); a study names its sizes, and by default has the other three.
DEFAULT_SIZES = ("tiny", "cpu", "gpu")
VERDICTS = ("agree", "disagree", "inconclusive")


def _origin(study: Any) -> Any:
    return getattr(study, "module", None), getattr(study, "name", None)


STUDIES = Registry("study", "study", origin=_origin)


@dataclass
class Context:
    """What an analysis sees: the study's output folder and its sweep folders by sweep name."""

    out: Path
    size: str
    sweep_dirs: dict[str, Path]

    def points(self, sweep: str | None = None):
        """Every evaluated checkpoint of a sweep's runs (testbed.fit.points.collect.collect_runs)."""
        from testbed.fit.points.collect import collect_runs

        return collect_runs(self.sweep_dirs[sweep] if sweep else self.out / "sweep")

    def finals(self, sweep: str | None = None):
        """The final (and cooldown) point of every run; a run that diverged (only a bracketed sweep
        keeps one, testbed.study.bracket) is a final point of infinite loss with `diverged` true: worse
        than any LR that trained, never dropped."""
        import pandas as pd

        points = self.points(sweep)
        finals = points[points["point_kind"].isin(["final", "cooldown"])].reset_index(drop=True)
        lost = diverged_rows(self.sweep_dirs[sweep] if sweep else self.out / "sweep", set(finals["run_id"]))
        if not lost:
            return finals
        return pd.concat([finals.assign(diverged=False), pd.DataFrame(lost)], ignore_index=True)


def diverged_rows(root: Path, have: set[str]) -> list[dict[str, Any]]:
    """A final row of infinite loss for each run under `root` whose status says it diverged and
    that has no final point: its run.json columns, planned tokens and FLOPs."""
    from testbed.fit.points.collect import run_columns
    from testbed.rundir import find_runs

    rows = []
    for run_dir in find_runs(root):
        status = run_dir.read_status()
        if not status.get("diverged"):
            continue
        row = run_columns(run_dir, run_dir.read_run() or {})
        if row["run_id"] in have:
            continue
        tokens, per_token = row.get("planned_tokens"), row.get("flops_per_token")
        rows.append({**row, "step": status.get("step"), "D": tokens,
                     "C": tokens * per_token if tokens and per_token else None,
                     "loss": math.inf, "bpb": math.inf, "point_kind": "final", "diverged": True})
    return rows


@dataclass
class Measurement:
    """One measured figure: the value, its interval (None when it cannot be had) and how."""

    name: str
    value: float | None
    low: float | None = None
    high: float | None = None
    unit: str = ""
    how: str = ""
    caveat: str = ""  # why no verdict may rest on it (see `decidable`)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "low": self.low, "high": self.high,
                "unit": self.unit, "how": self.how, "caveat": self.caveat}

    def text(self) -> str:
        if self.value is None or not np.isfinite(self.value):
            return f"{self.name}: not measurable ({self.how})"
        interval = (f" [{self.low:.4g}, {self.high:.4g}]"
                    if self.low is not None and self.high is not None else " (no interval)")
        caveat = f" (caveat: {self.caveat})" if self.caveat else ""
        return f"{self.name} = {self.value:.4g}{interval}{(' ' + self.unit) if self.unit else ''}{caveat}"


if TYPE_CHECKING:
    from typing_extensions import TypeIs

    class Decided(Measurement):
        """For the type checker: a Measurement that `decidable` passed (a value and an interval)."""

        value: float
        low: float
        high: float


@dataclass
class Analysis:
    """What `analyse` returns: the headline measurement, further ones, tables and plots."""

    headline: Measurement
    more: list[Measurement] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)  # file names written under the output folder
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Bracket:
    """A sweep's axes to extend until each cell's optimum lies inside them (testbed.study.bracket).

    `axes`: the grid keys to bracket (the LR, or a label an LR is derived from), each "log" (the next
    point one grid ratio beyond the edge) or "linear" (one grid step beyond). A cell is one value of
    every other axis but the seed; the point its seeds' mean loss chooses (a diverged run counts
    as worse than any) at the lowest or highest value of an axis adds that axis's next value
    beyond it, for every value of the cell's other bracketed axes and every seed, at most
    `rounds` times. A cell still at an edge after them keeps its caveat."""

    axes: Mapping[str, str]
    rounds: int = 2


@dataclass(frozen=True)
class Study:
    name: str
    version: int
    paper: str
    claim: str
    sweeps: Callable[[str], list[dict[str, Any]]]  # size -> sweep mappings
    analyse: Callable[[Context], Analysis]
    verdict: Callable[[Analysis], tuple[str, str]]  # -> (agree|disagree|inconclusive, why)
    caveat: str  # why the testbed might disagree with the paper for reasons other than the claim
    # After the sweeps (run only); its options: workers, and servers to pass on to run_sweep.
    extra: Callable[[Context, dict[str, Any]], None] | None = None
    # What changed since the previous version, in a line: the report prints it.
    changes: str = ""
    # Sweeps standing in for what `extra` trains (at placeholder values), so `study plan` can cost it.
    extra_cost: Callable[[str], list[dict[str, Any]]] | None = None
    sizes: Sequence[str] = DEFAULT_SIZES
    # size -> by sweep name, the axes extended until every cell's optimum lies inside its grid.
    brackets: Callable[[str], Mapping[str, Bracket]] | None = None
    module: str = ""

    def brackets_at(self, size: str) -> Mapping[str, Bracket]:
        return self.brackets(size) if self.brackets else {}


def register(study: Study) -> Study:
    """Add a study under its name; a different study under a taken name is an error."""
    if not study.module:
        import inspect

        frame = inspect.stack()[1]
        module = inspect.getmodule(frame[0])
        object.__setattr__(study, "module", module.__name__ if module else "")
    return STUDIES.register(study.name)(study)


# ---------------------------------------------------------------------------- statistics


def measured(name: str, estimate: Estimate, unit: str = "", caveats: Sequence[str] = ()) -> Measurement:
    """A study's figure from one of testbed.stats' estimates: its method becomes the `how`, and
    further caveats (grid edges of the cells it rests on) join the estimate's own."""
    caveat = "; ".join([c for c in [estimate.caveat, *caveats] if c])
    return Measurement(name, estimate.value, estimate.low, estimate.high, unit, estimate.method, caveat)


def decidable(m: Measurement) -> TypeIs[Decided]:
    """Whether a rule may decide on `m`: a value, an interval, and no caveat (an optimum at the
    edge of its grid or outside the sampled range is not a result)."""
    return m.value is not None and m.low is not None and m.high is not None and not m.caveat


def upper_end(m: Measurement) -> float:
    """How large `m` may be: the top of its interval, else its value (-inf with neither); to
    pick the worst of several measurements."""
    if m.high is not None:
        return m.high
    return m.value if m.value is not None else -math.inf


def choose(frame, by: list[str], lr: str = "peak_lr") -> LrChoice:
    """Each cell's rows at its learning rate, chosen without the winner's curse (testbed.stats.choice);
    the seed is the `train.seed` label where the study varies it."""
    return choose_lr(frame, by, lr=lr, seed="label_seed")


def lr_sensitivity(losses: Sequence[float], l_init: float) -> float:
    """LR sensitivity (Wortsman et al. 2023) over one LR grid: the mean over LRs of
    min(L(η), L_init) − L*, L* the best capped loss; a non-finite loss counts as L_init (a
    diverged run). Lower: a wider band of LRs that train well."""
    x = np.asarray(losses, float)
    capped = np.where(np.isfinite(x), np.minimum(x, l_init), l_init)
    return float(np.mean(capped - capped.min()))


def paired_by_seed(a, b, value: str = "loss") -> tuple[list[float], list[float]]:
    """Two arms' values matched by their seed label (each seed present in both)."""
    left = a.set_index("label_seed")[value] if "label_seed" in a else a[value].reset_index(drop=True)
    right = b.set_index("label_seed")[value] if "label_seed" in b else b[value].reset_index(drop=True)
    shared = sorted(set(left.index) & set(right.index))
    return [float(left[s]) for s in shared], [float(right[s]) for s in shared]


def within(m: Measurement, tolerance: float) -> str:
    """agree: the interval lies inside ±tolerance; disagree: it lies wholly outside;
    inconclusive otherwise (or without an interval, or with a caveat)."""
    if not decidable(m):
        return "inconclusive"
    if -tolerance <= m.low and m.high <= tolerance:
        return "agree"
    if m.low > tolerance or m.high < -tolerance:
        return "disagree"
    return "inconclusive"


def at_most(m: Measurement, tolerance: float) -> str:
    """One-sided: agree when the whole interval is <= tolerance, disagree when it is all above."""
    if not decidable(m):
        return "inconclusive"
    if m.high <= tolerance:
        return "agree"
    if m.low > tolerance:
        return "disagree"
    return "inconclusive"


def combine(parts: Sequence[str], disagree: str, agree: str, inconclusive: str) -> tuple[str, str]:
    """One verdict from several rules' (at_most, within): disagree when any part does, agree when
    every part does, inconclusive otherwise; with the matching reason."""
    if "disagree" in parts:
        return "disagree", disagree
    if parts and all(p == "agree" for p in parts):
        return "agree", agree
    return "inconclusive", inconclusive


def every_at_most(ms: Sequence[Measurement], tolerance: float, disagree: str, agree: str) -> tuple[str, str]:
    """`at_most` on each measurement, combined: disagree when any interval lies all above
    tolerance, agree when every one is at most tolerance, inconclusive (a straddling or missing
    interval) otherwise; with the matching reason."""
    return combine([at_most(m, tolerance) for m in ms], disagree=disagree, agree=agree,
                   inconclusive=f"some interval straddles {tolerance:.0%} or is missing (a single seed gives none)")


def above(m: Measurement, threshold: float, agree: str, disagree: str, holds: str,
          undecided: str) -> tuple[str, str]:
    """Two-sided on one measurement: agree when its whole interval lies above threshold, disagree
    when it lies all below; inconclusive when the interval holds threshold (reason `holds`) or when
    there is no interval or a caveat on it (reason `undecided`)."""
    if not decidable(m):
        return "inconclusive", undecided
    if m.low > threshold:
        return "agree", agree
    if m.high < threshold:
        return "disagree", disagree
    return "inconclusive", holds


@contextlib.contextmanager
def figure(path: Path, xlabel: str, ylabel: str = "final validation loss", log_base: float = 10) -> Iterator[Any]:
    """The axes of one small report plot, saved to `path` on leaving (log x axis; a legend when
    something was labelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    try:
        yield ax
        ax.set_xscale("log", base=log_base)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        from testbed.fit.reporting.style import tidy_log_axes

        tidy_log_axes(ax)  # at most ~6 labelled ticks on a log axis: no smear of minor labels
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def lr_plot(ctx: Context, frame, choice: LrChoice, name: str = "lr_sensitivity.png", lr: str = "peak_lr",
            loss: str = "loss") -> list[str]:
    """Loss against learning rate in each cell of `choice` (the mean over seeds at each LR of
    `frame`, the rows `choice` was made from), the LR the study chose marked: [name], or [] when
    no cell tried two learning rates. Cells of two or more keys get one axes per value of the
    first key (at most six, each with more than one cell), a line per value of the rest."""
    from testbed.fit.reporting.lr_plots import LrCurve
    from testbed.fit.reporting.lr_plots import lr_sensitivity as sensitivity_plot

    cells = choice.cells[[len(g) > 1 for g in choice.cells["grid"]]]
    if cells.empty:
        return []
    by = choice.by
    panel_key = (by[0] if len(by) > 1 and 1 < cells[by[0]].nunique() <= 6
                 and cells.groupby(by[0], dropna=False).size().max() > 1 else None)  # a panel of one line: none
    curves = []
    for _, cell in cells.iterrows():
        mask = np.ones(len(frame), dtype=bool)
        for column in by:
            value = cell[column]
            mask &= frame[column].isna().to_numpy() if _missing(value) else (frame[column] == value).to_numpy()
        means = frame[mask].groupby(lr)[loss].mean().sort_index()
        means = means[np.isfinite(means.to_numpy(float))]  # a diverged LR (+inf) is off the top
        shown = [c for c in by if c != panel_key]
        sizes = frame.loc[mask, "N"].unique() if "N" in frame.columns else []
        curves.append(LrCurve(label=", ".join(f"{_name(c)} {_value(cell[c])}" for c in shown),
                              lr=means.index.to_numpy(float), loss=means.to_numpy(float), chosen=float(cell["lr"]),
                              size=float(sizes[0]) if len(sizes) == 1 else None,
                              panel=f"{_name(panel_key)} {_value(cell[panel_key])}" if panel_key else ""))
    seeds = int(choice.cells["seeds"].max())
    sensitivity_plot(curves, ctx.out / name, "loss against learning rate" + (f" (mean over {seeds} seeds)" if seeds > 1 else ""),
                   chosen_label="LR chosen (mean over seeds)" if seeds > 1 else "LR chosen")
    return [name]


def _missing(value: Any) -> bool:
    return isinstance(value, float) and not np.isfinite(value)


def _name(column: str) -> str:
    return column.removeprefix("label_")


def _value(value: Any) -> str:
    from testbed.fit.estimation.guards import short

    if not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    return f"{float(value):.2g}" if abs(value) >= 1e6 else short(float(value))  # budgets as 1e+10, widths as 64
