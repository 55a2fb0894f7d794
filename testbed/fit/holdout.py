"""Held-out validation: fit on the smaller runs, predict the larger ones.

Rules: `largest` holds out the top 10% of runs by compute (at least one run), `largest:K`
the K largest runs, and a column rule such as `N>1e8` the rows it matches. Whole runs are held
out together, so a run's checkpoints never sit on both sides of the split.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from testbed.errors import TestbedError

_RULE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")
_OPS = {">": np.greater, "<": np.less, ">=": np.greater_equal, "<=": np.less_equal,
        "==": np.equal, "!=": np.not_equal}


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


def holdout_mask(frame: pd.DataFrame, rule: str) -> np.ndarray:
    """True for rows held out by `rule`."""
    rule = rule.strip()
    if rule.startswith("largest"):
        count = None
        if rule != "largest":
            try:
                count = int(rule.split(":", 1)[1])
            except (IndexError, ValueError):
                raise TestbedError(f"--holdout {rule!r} is not largest or largest:K; write e.g. largest:2.")
        per_run = run_compute(frame).groupby(frame["run_id"]).max().sort_values(ascending=False)
        if count is None:
            count = max(1, int(round(0.1 * len(per_run))))
        if count >= len(per_run):
            raise TestbedError(f"--holdout {rule!r} would hold out all {len(per_run)} runs; hold out fewer.")
        held = set(per_run.index[:count])
        return frame["run_id"].isin(held).to_numpy()
    mask = rule_mask(frame, rule)
    if mask.all():
        raise TestbedError(f"--holdout {rule!r} holds out every point; choose a rule that leaves points to fit.")
    if not mask.any():
        raise TestbedError(f"--holdout {rule!r} matches no point; choose a rule that holds some out.")
    # Hold out whole runs: a run with any matching row goes entirely to the held-out side.
    held_runs = set(frame.loc[mask, "run_id"])
    return frame["run_id"].isin(held_runs).to_numpy()


def rule_mask(frame: pd.DataFrame, rule: str, option: str = "--holdout") -> np.ndarray:
    """Rows matching a column rule such as `N>1e8` or `label_norm==peri`."""
    match = _RULE.match(rule)
    if not match:
        raise TestbedError(f"{option} {rule!r} is not understood; write a rule like 'N>1e8'.")
    column, op, value = match.groups()
    if column not in frame.columns:
        raise TestbedError(
            f"{option} {rule!r} names column {column!r}, which the table lacks; "
            f"use one of {', '.join(map(str, frame.columns))}."
        )
    try:
        threshold = float(value)
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
    except ValueError:
        threshold, values = value, frame[column].astype(str).to_numpy()
    return np.asarray(_OPS[op](values, threshold), dtype=bool)


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
