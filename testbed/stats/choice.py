"""The learning rate of each cell, chosen without the winner's curse, and where it sits in its grid.

Choosing the LR with the lowest loss and reporting that loss on the same seeds reports a minimum
of noisy values: it is biased low, and more so for the arm with more LR candidates. With two or
more seeds the choice is cross-fitted: each seed's loss is read at the LR the *other* seeds
prefer, so the measured value never took part in its own selection. With one seed that cannot be
done; the result says so. An optimum at the lowest or highest LR of its grid is not an optimum
(the best LR may lie beyond), and the cell says so: no verdict may rest on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

CROSS_FIT = "LR cross-fitted: each seed measured at the LR the other seeds chose"
IN_SAMPLE = "one seed: the LR was chosen on the seed that measures it (optimistic, not bounded)"


@dataclass
class LrChoice:
    """`rows`: one measured row per cell and seed; `cells`: per cell the LR the seed means choose,
    its grid and its edge ('' inside, 'lowest' or 'highest'); `method`: how the rows were chosen."""

    rows: pd.DataFrame
    cells: pd.DataFrame
    method: str

    def edges(self, where: dict | None = None) -> list[str]:
        """One line naming the cells (those matching `where`, a column -> value map) whose LR sits
        at the edge of its grid, or an empty list when none does."""
        cells = self.cells
        for column, value in (where or {}).items():
            cells = cells[cells[column] == value]
        edged = cells[cells["edge"] != ""]
        if edged.empty:
            return []
        named = ", ".join(" ".join(_short(r[k]) for k in self.by) + f": {r['lr']:g} ({r['edge']})"
                          for _, r in edged.iterrows())
        grids = sorted({str([float(f"{v:g}") for v in g]) for g in edged["grid"]})
        return [f"LR at the edge of its grid {' / '.join(grids)} in {len(edged)} of {len(cells)} cells ({named})"]

    @property
    def by(self) -> list[str]:
        return [c for c in self.cells.columns if c not in ("lr", "grid", "edge", "seeds")]


def choose_lr(frame: pd.DataFrame, by: list[str], lr: str = "peak_lr", loss: str = "loss",
              seed: str = "seed") -> LrChoice:
    """For each cell of `by`: the measured rows at a cross-fitted LR (see the module), and the
    LR the mean over all seeds chooses, with its place in the cell's grid."""
    frame = frame.copy()
    if seed not in frame.columns:
        frame[seed] = 0
    rows, cells = [], []
    for key, cell in frame.groupby(by, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        grid = sorted(float(v) for v in cell[lr].unique())
        means = cell.groupby(lr)[loss].mean()
        chosen = float(means.idxmin())
        edge = "" if len(grid) < 2 else "lowest" if chosen == grid[0] else "highest" if chosen == grid[-1] else ""
        seeds = sorted(cell[seed].unique())
        cells.append({**dict(zip(by, key)), "lr": chosen, "grid": grid, "edge": edge, "seeds": len(seeds)})
        for s in seeds:
            others = cell[cell[seed] != s]
            pick = float(others.groupby(lr)[loss].mean().idxmin()) if len(seeds) > 1 else chosen
            rows.append(cell[(cell[seed] == s) & (cell[lr] == pick)])
    seeds_per_cell = {c["seeds"] for c in cells}
    method = CROSS_FIT if min(seeds_per_cell) > 1 else IN_SAMPLE
    if any(len(c["grid"]) < 2 for c in cells):
        method += "; some cells have one LR (not tuned)"
    measured = pd.concat(rows, ignore_index=True) if rows else frame.iloc[:0]
    return LrChoice(measured, pd.DataFrame(cells), method)


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
