"""Extend a study sweep's LR axes until every cell's optimum lies inside its grid.

An optimum at the lowest or highest LR of a grid is not an optimum: the best may lie beyond. A
fixed grid wide enough for every cell of a study (sizes a decade apart, budgets, vocabularies)
spends most of its runs far from any cell's optimum; a narrow one leaves cells at an edge. A
bracketed sweep (a study's `brackets`, base.Bracket) trains its grid, reads each cell's mean loss
over seeds at every point, and where the best point sits at an edge of a bracketed axis trains
that axis's next value beyond it (one grid ratio, or step, further) in that cell only, for every
seed, then looks again, at most `rounds` times. The extension is a function of the finished runs,
so a study run again after an interruption plans the same runs (their ids are config hashes) and
trains only what is missing.

A run that diverges (status.json `diverged`, the trainer's NonFiniteLoss or Diverged) is a
measured outcome here, worse than any LR that trained: it closes that side of the grid. Any other
failure stops the study as in every sweep.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError
from testbed.study.base import Bracket, Context
from testbed.study.sweeps import run_sweep, vary_data_order

SEED_KEYS = ("train.seed", "data.seed")
SCALES = ("log", "linear")


def check(bracket: Bracket, spec: dict[str, Any]) -> None:
    """Refuse a bracket whose axes are not numeric grid axes of the sweep, or whose scale or rounds
    are not understood, naming the field."""
    from testbed.sweep.spec import axis_mapping

    where = f"sweep {spec.get('name')!r}: bracket"
    grid = axis_mapping(spec.get("grid"), "grid", where)
    if not isinstance(bracket.rounds, int) or bracket.rounds < 0:
        raise ConfigError(f"{where} rounds={bracket.rounds!r} must be a whole number >= 0, e.g. 2")
    if not bracket.axes:
        raise ConfigError(f"{where} axes={{}} names no axis; give e.g. {{'optim.lr': 'log'}}")
    for key, scale in bracket.axes.items():
        if key not in grid:
            raise ConfigError(f"{where} axis {key!r} is not a grid axis of the sweep; choose among "
                              f"{', '.join(grid) or '(no grid axes)'}")
        if scale not in SCALES:
            raise ConfigError(f"{where} axis {key!r} scale={scale!r} must be one of {', '.join(SCALES)}")
        values = grid[key]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where} axis {key!r} has values {values!r}; a bracketed axis must be numeric")
        if scale == "log" and min(values) <= 0:
            raise ConfigError(f"{where} axis {key!r} has values {values!r}; a log axis must be positive "
                              "(use 'linear' for steps such as -1, 0, 1)")


def points(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The sweep's runs as assignments of every axis key (grid and zip), in the sweep's order."""
    from testbed.sweep.spec import axis_mapping, expand

    where = f"sweep {spec.get('name')!r}"
    return expand(axis_mapping(spec.get("grid"), "grid", where), axis_mapping(spec.get("zip"), "zip", where), where)


def as_points(spec: dict[str, Any], assignments: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep with exactly these runs: every axis a zip axis over the assignments (same keys,
    order and labels, so the runs get the ids the grid would give them)."""
    keys = list(assignments[0])
    return {**spec, "grid": {}, "zip": {key: [a[key] for a in assignments] for key in keys}}


def beyond(values: list[float], scale: str, side: str) -> float:
    """The next value past the lowest (side "low") or highest ("high") of sorted `values`: one
    ratio (log) or step (linear) of the two outermost points further."""
    low, high = (values[0], values[1]) if side == "low" else (values[-2], values[-1])
    if scale == "log":
        ratio = high / low
        value = low / ratio if side == "low" else high * ratio
        return float(f"{value:.6g}")  # a grid that prints as 0.0064, not 0.0064000000000000003
    step = high - low
    return low - step if side == "low" else high + step


def _cell(assignment: dict[str, Any], bracketed: set[str]) -> tuple:
    return tuple((k, v) for k, v in assignment.items() if k not in bracketed and k not in SEED_KEYS)


def extensions(assignments: list[dict[str, Any]], losses: list[float], bracket: Bracket) -> list[dict[str, Any]]:
    """The runs to add: for each cell whose best point (lowest mean loss over seeds; a diverged run
    is +inf, so a point with one counts as worse than any) sits at the edge of a bracketed axis with
    two or more values, that axis's next value beyond the edge, crossed with the cell's values of
    its other bracketed axes and its seeds. Cells with no finite loss add nothing."""
    bracketed = set(bracket.axes)
    cells: dict[tuple, list[tuple[dict[str, Any], float]]] = {}
    for assignment, loss in zip(assignments, losses):
        cells.setdefault(_cell(assignment, bracketed), []).append((assignment, loss))
    added: list[dict[str, Any]] = []
    seen = {tuple(sorted(a.items(), key=lambda kv: kv[0])) for a in assignments}
    for members in cells.values():
        by_point: dict[tuple, list[float]] = {}
        for assignment, loss in members:
            by_point.setdefault(tuple(assignment[k] for k in bracket.axes), []).append(loss)
        means = {point: math.fsum(v) / len(v) for point, v in by_point.items()}
        finite = {p: m for p, m in means.items() if math.isfinite(m)}
        if not finite:
            continue
        best = min(finite, key=lambda point: finite[point])
        template = members[0][0]
        seeds = sorted({tuple((k, a[k]) for k in SEED_KEYS if k in a) for a, _ in members})
        for i, scale in enumerate(bracket.axes.values()):
            values = sorted({p[i] for p in means})
            if len(values) < 2 or values[0] < best[i] < values[-1]:
                continue
            new = beyond(values, scale, "low" if best[i] == values[0] else "high")
            others = sorted({p[:i] + p[i + 1:] for p in means})
            for rest in others:
                point = rest[:i] + (new,) + rest[i:]
                for seed in seeds:
                    assignment = {**template, **dict(zip(bracket.axes, point)), **dict(seed)}
                    marker = tuple(sorted(assignment.items(), key=lambda kv: kv[0]))
                    if marker not in seen:
                        seen.add(marker)
                        added.append(assignment)
    return added


def outcomes(folder: Path, run_ids: list[str]) -> list[float]:
    """Each run's final validation loss (+inf where it diverged), in the order of `run_ids`."""
    finals = Context(folder.parent.parent, "", {folder.name: folder}).finals(folder.name)
    finals = finals[finals["point_kind"] == "final"]
    loss = {Path(d).name: float(v) for d, v in zip(finals["run_dir"], finals["loss"])}  # by the registry's id
    missing = [r for r in run_ids if r not in loss]
    if missing:
        raise ConfigError(f"bracketed sweep {folder}: runs {', '.join(missing[:3])} have no final "
                          "evaluation to choose an LR by; they must evaluate at their end")
    return [loss[r] for r in run_ids]


def run_bracketed(out: Path, spec: dict[str, Any], bracket: Bracket, log=print, **options: Any) -> Path:
    """Train the sweep, then its extensions until every cell is bracketed or `rounds` are spent;
    returns the sweep's folder (one folder, one registry: the analysis reads every run)."""
    from testbed.sweep.registry import Registry
    from testbed.sweep.spec import load_sweep

    check(bracket, spec)
    folder = run_sweep(out, spec, log=log, accept_diverged=True, **options)
    assignments = points(spec)
    for round_ in range(1, bracket.rounds + 1):
        ids = Registry(folder).add_runs(load_sweep(vary_data_order(as_points(spec, assignments))))
        added = extensions(assignments, outcomes(folder, ids), bracket)
        if not added:
            break
        log(f"sweep {spec['name']}: bracket round {round_}: {len(added)} runs beyond a grid edge")
        run_sweep(out, as_points(spec, added), log=log, accept_diverged=True, **options)
        assignments = assignments + added
    return folder


def most_added(spec: dict[str, Any], bracket: Bracket) -> int:
    """The most runs bracketing can add to the sweep: each round, in every cell, one slab per
    bracketed axis (the other bracketed axes' values as the grid has them, times the seeds)."""
    grid = (spec.get("grid") or {})
    sizes = {k: len(v) if isinstance(v, list) else 1 for k, v in grid.items()}
    if any(sizes.get(k, 1) < 2 for k in bracket.axes):
        return 0
    every = len(points(spec))
    bracketed = math.prod(sizes[k] for k in bracket.axes)
    slabs = sum(bracketed // sizes[k] for k in bracket.axes)
    return bracket.rounds * (every // bracketed) * slabs
