"""Held-out validation: fit on the smaller runs, predict the larger ones.

Rules: `largest` holds out the top 10% of runs by compute (at least one run), `largest:K`
the K largest runs; `largest-N` / `largest-D` (optionally `:K`) the runs of the largest model
sizes / token counts; and a row rule (testbed/fit/points/rules.py) such as `N>1e8` the rows it
matches. Whole runs are held out together, so a run's checkpoints never sit on both sides of the
split, except for rules on `run_fraction` or `step`, which hold out late checkpoints.

Each rule has an axis (`N`, `D`, `C` or `late`): the direction the validation extrapolates in.
`--variant auto` validates its candidates along the same axis inside the training data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from testbed.errors import TestbedError
from testbed.fit.points.rules import rule_columns
from testbed.fit.points.rules import rule_mask as _rule_mask

ROW_COLUMNS = ("run_fraction", "step")  # rules on these hold out checkpoints, not whole runs
_AXES = {"largest": "C", "largest-C": "C", "largest-N": "N", "largest-D": "D"}


def run_compute(frame: pd.DataFrame) -> pd.Series:
    """Each run's largest compute (C, else 6·N·D, else the input X), per row."""
    for column in ("C", "X"):
        if column in frame.columns:
            compute = pd.to_numeric(frame[column], errors="coerce")
            break
    else:
        if not {"N", "D"} <= set(frame.columns):
            raise TestbedError("--holdout largest needs a compute column C (or N and D); map one with --columns C=COLUMN.")
        compute = 6.0 * frame["N"] * frame["D"]
    return compute.groupby(frame["run_id"]).transform("max")


def run_size(frame: pd.DataFrame, axis: str) -> pd.Series:
    """Each run's size along `axis` (N, D or C), per row."""
    if axis == "C":
        return run_compute(frame)
    if axis not in frame.columns:
        raise TestbedError(f"--holdout largest-{axis} needs a column {axis}; map one with --columns {axis}=COLUMN.")
    return pd.to_numeric(frame[axis], errors="coerce").groupby(frame["run_id"]).transform("max")


def rule_axis(frame: pd.DataFrame, rule: str | None) -> str:
    """The axis a holdout rule extrapolates along: N, D, C (compute) or late (checkpoints)."""
    if not rule:
        return "C"
    head = rule.strip().split(":", 1)[0]
    if head in _AXES:
        return _AXES[head]
    columns = rule_columns(frame, rule)
    for column in columns:
        if column in ROW_COLUMNS:
            return "late"
    for column in columns:
        if column == "N" or column.startswith("N_"):
            return "N"
        if column in ("D", "U", "epochs"):
            return "D"
    return "C"


def largest_runs(frame: pd.DataFrame, axis: str, count: int | None = None, rule: str = "largest") -> np.ndarray:
    """Hold out the runs at the largest values along `axis`: whole levels of N or D (all runs of
    the largest model size, say), about 10% of the runs, or the `count` largest runs."""
    per_run = run_size(frame, axis).groupby(frame["run_id"]).max().sort_values(ascending=False)
    if count is not None:
        if count >= len(per_run):
            raise TestbedError(f"--holdout {rule!r} would hold out all {len(per_run)} runs; hold out fewer.")
        return frame["run_id"].isin(set(per_run.index[:count])).to_numpy()
    target = max(1, int(round(0.1 * len(per_run))))
    if axis == "C":
        if target >= len(per_run):
            raise TestbedError(f"--holdout {rule!r} would hold out all {len(per_run)} runs; hold out fewer.")
        return frame["run_id"].isin(set(per_run.index[:target])).to_numpy()
    levels = np.sort(per_run.unique())[::-1]
    held_levels: list[float] = []
    for level in levels:
        held_levels.append(level)
        if (per_run >= level).sum() >= target:
            break
    if len(held_levels) >= len(levels):
        raise TestbedError(f"--holdout {rule!r} would hold out every run: all runs share one {axis}; "
                           f"hold out along another axis (e.g. --holdout largest).")
    held = per_run.index[per_run >= held_levels[-1]]
    return frame["run_id"].isin(set(held)).to_numpy()


def holdout_mask(frame: pd.DataFrame, rule: str) -> np.ndarray:
    """True for rows held out by `rule`."""
    rule = rule.strip()
    head, _, count_text = rule.partition(":")
    if head in _AXES:
        count = None
        if count_text:
            try:
                count = int(count_text)
            except ValueError:
                raise TestbedError(f"--holdout {rule!r} is not {head} or {head}:K; write e.g. {head}:2.") from None
            if count < 1:
                raise TestbedError(f"--holdout {rule!r}: K must be at least 1; write e.g. {head}:2.")
        return largest_runs(frame, _AXES[head], count, rule)
    mask = rule_mask(frame, rule)
    if mask.all():
        raise TestbedError(f"--holdout {rule!r} holds out every point; choose a rule that leaves points to fit.")
    if not mask.any():
        raise TestbedError(f"--holdout {rule!r} matches no point; choose a rule that holds some out.")
    if rule_axis(frame, rule) == "late":
        return mask  # late checkpoints: the early ones of the same runs are fitted
    # Hold out whole runs: a run with any matching row goes entirely to the held-out side.
    held_runs = set(frame.loc[mask, "run_id"])
    return frame["run_id"].isin(held_runs).to_numpy()


def inner_mask(frame: pd.DataFrame, axis: str) -> np.ndarray:
    """The validation split inside the training data along `axis` (for --variant auto)."""
    if axis == "late":
        fraction = pd.to_numeric(frame["run_fraction"], errors="coerce")
        return (fraction > fraction.quantile(0.8)).to_numpy()
    return largest_runs(frame, axis, rule=f"largest-{axis}" if axis != "C" else "largest")


def rule_mask(frame: pd.DataFrame, rule: str, option: str = "--holdout") -> np.ndarray:
    """Rows matching a rule such as `N>1e8` or `label_norm=='peri' and C>1e17`."""
    return _rule_mask(frame, rule, option)


def evaluate(predicted: np.ndarray, frame: pd.DataFrame) -> dict:
    """Each held-out point's prediction and relative error, and their mean absolute value."""
    observed = frame["loss"].to_numpy(dtype=float)
    rel = (predicted - observed) / np.abs(observed)
    keys = [c for c in ("run_id", "N", "D", "C", "U", "X", "step") if c in frame.columns]
    points = []
    for i in range(len(frame)):
        row = {k: (frame[k].iloc[i].item() if hasattr(frame[k].iloc[i], "item") else frame[k].iloc[i]) for k in keys}
        row.update(loss=float(observed[i]), predicted=float(predicted[i]), rel_error=float(rel[i]))
        points.append(row)
    return {"holdout": points, "mean_abs_rel_error": float(np.mean(np.abs(rel)))}
