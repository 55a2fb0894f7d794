"""What a study is: the `Study` record, the `STUDIES` registry and the statistics studies share.

A study declares its paper and claim, its sweeps per size (plain sweep mappings, the same
language as a sweep file), an optional `extra` step run after the sweeps (cooldown branches),
an `analyse` function over the collected points and a `verdict` function over what it measured.
Verdicts are reported as found: the thresholds are fixed in the study's code, before any run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from testbed.registry import Registry

SIZES = ("tiny", "cpu", "gpu")
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
        """Every evaluated checkpoint of a sweep's runs (testbed.fit.collect.collect_runs)."""
        from testbed.fit.collect import collect_runs

        return collect_runs(self.sweep_dirs[sweep] if sweep else self.out / "sweep")

    def finals(self, sweep: str | None = None):
        """The final (and cooldown) point of every run."""
        points = self.points(sweep)
        return points[points["point_kind"].isin(["final", "cooldown"])].reset_index(drop=True)


@dataclass
class Measurement:
    """One measured figure: the value, its interval (None when it cannot be had) and how."""

    name: str
    value: float | None
    low: float | None = None
    high: float | None = None
    unit: str = ""
    how: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "low": self.low, "high": self.high,
                "unit": self.unit, "how": self.how}

    def text(self) -> str:
        if self.value is None or not np.isfinite(self.value):
            return f"{self.name}: not measurable ({self.how})"
        interval = (f" [{self.low:.4g}, {self.high:.4g}]"
                    if self.low is not None and self.high is not None else " (no interval)")
        return f"{self.name} = {self.value:.4g}{interval}{(' ' + self.unit) if self.unit else ''}"


@dataclass
class Analysis:
    """What `analyse` returns: the headline measurement, further ones, tables and plots."""

    headline: Measurement
    more: list[Measurement] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)  # file names written under the output folder
    notes: list[str] = field(default_factory=list)


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
    # Sweeps standing in for what `extra` trains (at placeholder values), so `study plan` can cost it.
    extra_cost: Callable[[str], list[dict[str, Any]]] | None = None
    sizes: Sequence[str] = SIZES
    module: str = ""


def register(study: Study) -> Study:
    """Add a study under its name; a different study under a taken name is an error."""
    if not study.module:
        import inspect

        frame = inspect.stack()[1]
        module = inspect.getmodule(frame[0])
        object.__setattr__(study, "module", module.__name__ if module else "")
    return STUDIES.register(study.name)(study)


# ---------------------------------------------------------------------------- statistics


def bootstrap(groups: Sequence[Sequence[float]], statistic: Callable[..., float],
              n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of `statistic(*samples)`, resampling each group (e.g. the seeds of
    one arm) with replacement; (None, None) when a group has a single value."""
    arrays = [np.asarray(g, float) for g in groups]
    if any(len(a) < 2 for a in arrays):
        return None, None
    rng = np.random.default_rng(seed)
    draws = [a[rng.integers(0, len(a), size=(n, len(a)))] for a in arrays]
    values = np.array([statistic(*(d[i] for d in draws)) for i in range(n)], float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None, None
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def relative_gap(a: Sequence[float], b: Sequence[float]) -> Measurement:
    """(mean a − mean b) / mean b, with a bootstrap interval over the seeds of each side."""
    def stat(x, y):
        return (np.mean(x) - np.mean(y)) / np.mean(y)

    value = float(stat(np.asarray(a, float), np.asarray(b, float)))
    low, high = bootstrap([a, b], stat)
    how = (f"bootstrap over seeds ({len(a)} vs {len(b)})" if low is not None
           else "one seed per side: no interval")
    return Measurement("relative gap", value, low, high, "", how)


def compute_multiplier(baseline: dict[float, float], variant: dict[float, float], n: int = 2000,
                       seed: int = 0) -> tuple[Measurement, list[dict[str, Any]]]:
    """How much compute the baseline needs to match the variant: each arm's frontier (loss at its
    tuned LR per budget C, {C: loss}) is fitted as L = A·C^(-alpha) in log-log, and the multiplier
    at budget C is C_baseline(L_variant(C)) / C (> 1: the variant is ahead). The headline is the
    multiplier at the largest budget; its interval comes from a bootstrap over the budgets of each
    arm (refitting both frontiers); the rows give it at every budget, with where it crosses 1."""
    def frontier(points):
        c, loss = np.log(np.asarray(list(points), float)), np.log(np.asarray(list(points.values()), float))
        slope, intercept = np.polyfit(c, loss, 1)
        return -slope, intercept  # alpha, log A

    def multiplier(a, b, at):
        alpha_a, log_a = frontier(a)
        alpha_b, log_b = frontier(b)
        if alpha_a <= 0:  # a flat or rising frontier: the baseline never reaches lower losses
            return float("nan")
        log_loss = log_b - alpha_b * np.log(at)  # the variant's loss at C
        return float(np.exp((log_a - log_loss) / alpha_a) / at)

    budgets = sorted(set(baseline) & set(variant))
    top = budgets[-1]
    value: float | None = multiplier(baseline, variant, top)
    value = value if value is not None and np.isfinite(value) else None
    rng = np.random.default_rng(seed)
    draws = []
    keys_a, keys_b = list(baseline), list(variant)
    for _ in range(n):
        pick_a = [keys_a[i] for i in rng.integers(0, len(keys_a), len(keys_a))]
        pick_b = [keys_b[i] for i in rng.integers(0, len(keys_b), len(keys_b))]
        if len(set(pick_a)) < 2 or len(set(pick_b)) < 2:
            continue
        draws.append(multiplier({c: baseline[c] for c in pick_a}, {c: variant[c] for c in pick_b}, top))
    draws = [d for d in draws if np.isfinite(d)]
    low = high = None
    if len(draws) >= n // 4:
        low, high = float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))
    how = (f"power-law frontiers L = A·C^-alpha per arm; bootstrap over budgets ({len(draws)} replicates)"
           if low is not None else "power-law frontiers per arm; too few budgets for an interval")
    rows, previous = [], None
    for c in budgets:
        m = multiplier(baseline, variant, c)
        rows.append({"C": c, "baseline_loss": baseline[c], "variant_loss": variant[c], "multiplier": m,
                     "crosses_1": previous is not None and (previous - 1) * (m - 1) < 0})
        previous = m
    return Measurement(f"compute multiplier at C = {top:.3g}", value, low, high, "x", how), rows


def within(m: Measurement, tolerance: float) -> str:
    """agree: the interval lies inside ±tolerance; disagree: it lies wholly outside;
    inconclusive otherwise (or without an interval)."""
    if m.value is None or m.low is None or m.high is None:
        return "inconclusive"
    if -tolerance <= m.low and m.high <= tolerance:
        return "agree"
    if m.low > tolerance or m.high < -tolerance:
        return "disagree"
    return "inconclusive"


def tuned(frame, by: list[str], lr: str = "peak_lr", loss: str = "loss"):
    """For each cell of `by`, the rows at the learning rate whose seed-mean loss is lowest."""
    means = frame.groupby(by + [lr], dropna=False)[loss].mean().reset_index()
    best = means.loc[means.groupby(by, dropna=False)[loss].idxmin(), by + [lr]]
    return frame.merge(best, on=by + [lr])


def at_most(m: Measurement, tolerance: float) -> str:
    """One-sided: agree when the whole interval is <= tolerance, disagree when it is all above."""
    if m.value is None or m.low is None or m.high is None:
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
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
