"""Step Law hyperparameter rules (Li et al. 2025, "Predictable Scale: Part I").

lr_opt(N, D) = 1.79 · N^-0.713 · D^0.307 and bs_opt(D) = 0.58 · D^0.571 (batch size in tokens),
with N the non-embedding parameters and D the training tokens. Plain functions so a sweep
planner can call them; `fit_rules` re-derives the constants from an LR x batch sweep
(`testbed fit hparams TABLE`), and `refit` is its best-point-only form on the paper's table.

Near-optimal band: in each (N, D) cell, every run whose loss is within `band` (relative) of the
cell's best is kept, not the best run alone. On a grid of learning rates and batch sizes the best
run sits on a grid point, so its LR can be off by half a grid step; the runs in the band
surround the optimum of the loss bowl, so their mean log LR estimates it more finely. Each cell
weighs the same in the least-squares fit however many runs fall in its band.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from testbed.errors import TestbedError

LR_COEF, LR_N_EXP, LR_D_EXP = 1.79, -0.713, 0.307
BS_COEF, BS_D_EXP = 0.58, 0.571


def _positive(name: str, value) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if not np.all(arr > 0):
        raise TestbedError(f"{name}={value} must be positive; pass a parameter or token count > 0.")
    return arr


def optimal_lr(n_params, tokens):
    """Peak learning rate for N non-embedding parameters trained on D tokens."""
    out = LR_COEF * _positive("N", n_params) ** LR_N_EXP * _positive("D", tokens) ** LR_D_EXP
    return float(out) if out.ndim == 0 else out


def optimal_batch_tokens(tokens):
    """Batch size in tokens for a run of D tokens."""
    out = BS_COEF * _positive("D", tokens) ** BS_D_EXP
    return float(out) if out.ndim == 0 else out


def near_optimal(table: pd.DataFrame, band: float, loss: str = "loss") -> pd.DataFrame:
    """The rows of each (N, D) cell whose loss is within `band` (relative) of the cell's best;
    `weight` = 1 / (rows kept in the cell)."""
    if not band >= 0:
        raise TestbedError(f"--band {band} must be a relative loss >= 0, e.g. --band 0.005 (0: the best run only).")
    best = table.groupby(["N", "D"])[loss].transform("min")
    kept = table[table[loss] <= best * (1.0 + band) + 1e-15].copy()
    kept["weight"] = 1.0 / kept.groupby(["N", "D"])[loss].transform("size")
    return kept


RULES = {"lr": ("the LR rule", "learning rates", ("lr_coef", "lr_N_exp", "lr_D_exp")),
         "batch": ("the batch rule", "batch sizes", ("bs_coef", "bs_D_exp"))}


def never_varies(table: pd.DataFrame, axis: str) -> str | None:
    """Why `axis` (lr or batch) cannot be fitted: it takes one value in every (N, D) cell, so each
    cell's "optimum" is that value and not a searched one; None when some cell varies it."""
    if table.groupby(["N", "D"])[axis].nunique().max() >= 2:
        return None
    values = np.sort(table[axis].unique())
    if len(values) == 1:
        return f"{axis}={values[0]:.4g} in every row"
    return f"one {axis} per cell, {len(values)} values from {values[0]:.4g} to {values[-1]:.4g}"


def fit_rules(table: pd.DataFrame, band: float = 0.0, loss: str = "loss") -> dict[str, Any]:
    """lr_opt = lr_coef·N^lr_N_exp·D^lr_D_exp and bs_opt (tokens) = bs_coef·D^bs_D_exp by
    weighted least squares in log space on the near-optimal runs of each (N, D) cell.

    `table` holds N, D, lr, batch (tokens per step) and the loss column. A rule whose axis never
    varies within a cell is not fitted (its exponents would be 0 whatever the optimum): its
    coefficients are None and `skipped` says why; when neither varies, nothing can be fitted."""
    for column in ("N", "D", "lr", "batch", loss):
        if column not in table.columns:
            raise TestbedError(f"the LR x batch sweep table has no column {column!r}; provide N, D, lr, batch "
                               f"(tokens per step) and {loss}, mapping names with --columns (e.g. batch=bs).")
    table = table[["N", "D", "lr", "batch", loss]].apply(pd.to_numeric, errors="coerce").dropna()
    for column in ("N", "D", "lr", "batch"):
        if not (table[column] > 0).all():
            raise TestbedError(f"the sweep table's {column} column holds values <= 0; give positive sizes.")
    cells = table.groupby(["N", "D"]).ngroups
    if cells < 3 or table["N"].nunique() < 2 or table["D"].nunique() < 2:
        raise TestbedError(f"the hyperparameter rules need at least 3 (N, D) cells with two or more N and D values, "
                           f"got {cells} cells; add runs at other sizes.")
    constant = {axis: why for axis in RULES if (why := never_varies(table, axis)) is not None}
    if len(constant) == len(RULES):
        raise TestbedError(f"lr and batch never vary within an (N, D) cell ({constant['lr']}; {constant['batch']}): "
                           f"no rule can be fitted; sweep two or more learning rates and batch sizes per cell "
                           f"(e.g. configs/sweeps/lr_batch.yaml).")
    skipped = {}
    for axis, why in constant.items():
        rule, plural, _ = RULES[axis]
        other = RULES["batch" if axis == "lr" else "lr"][0]
        skipped[axis] = (f"{axis} never varies within an (N, D) cell ({why}): {rule} is not fitted (its exponents "
                         f"would be 0 whatever the optimum), and {other} holds at that {axis} only; sweep two or "
                         f"more {plural} per cell to fit it.")
    kept = near_optimal(table, band, loss)
    root_w = np.sqrt(kept["weight"].to_numpy(float))
    log_n, log_d = np.log(kept["N"].to_numpy(float)), np.log(kept["D"].to_numpy(float))
    rules: dict[str, Any] = {}
    if "lr" not in skipped:
        design = np.column_stack([np.ones(len(kept)), log_n, log_d]) * root_w[:, None]
        lr_coef = np.linalg.lstsq(design, np.log(kept["lr"].to_numpy(float)) * root_w, rcond=None)[0]
        rules.update(lr_coef=float(np.exp(lr_coef[0])), lr_N_exp=float(lr_coef[1]), lr_D_exp=float(lr_coef[2]))
    if "batch" not in skipped:
        bs_design = np.column_stack([np.ones(len(kept)), log_d]) * root_w[:, None]
        bs_coef = np.linalg.lstsq(bs_design, np.log(kept["batch"].to_numpy(float)) * root_w, rcond=None)[0]
        rules.update(bs_coef=float(np.exp(bs_coef[0])), bs_D_exp=float(bs_coef[1]))
    for axis in skipped:
        rules.update(dict.fromkeys(RULES[axis][2]))
    return {**rules, "cells": int(cells), "runs_in_band": int(len(kept)), "band": float(band), "skipped": skipped}


def predict(rules: dict[str, Any], n_params, tokens) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(lr_opt, batch tokens) at N, D under fitted `rules` (the published ones: `PUBLISHED`);
    None for a rule that was not fitted (fit_rules' `skipped`)."""
    n, d = _positive("N", n_params), _positive("D", tokens)
    lr = None if rules["lr_coef"] is None else rules["lr_coef"] * n ** rules["lr_N_exp"] * d ** rules["lr_D_exp"]
    batch = None if rules["bs_coef"] is None else rules["bs_coef"] * d ** rules["bs_D_exp"]
    return lr, batch


PUBLISHED = {"lr_coef": LR_COEF, "lr_N_exp": LR_N_EXP, "lr_D_exp": LR_D_EXP, "bs_coef": BS_COEF, "bs_D_exp": BS_D_EXP}


def refit(table: pd.DataFrame, loss: str = "smooth loss", seq_len: int = 2048) -> dict[str, float]:
    """Refit both rules: the best (lr, bs) of each (N, D) cell, then least squares in log space.

    `table` holds N, D, lr, bs (in sequences of `seq_len` tokens) and the loss column.
    """
    for column in ("N", "D", "lr", "bs", loss):
        if column not in table.columns:
            raise TestbedError(f"the Step Law table has no column {column!r}; provide N, D, lr, bs and {loss}.")
    best = table.loc[table.groupby(["N", "D"])[loss].idxmin()]
    if len(best) < 3:
        raise TestbedError(f"the Step Law refit needs at least 3 (N, D) cells, got {len(best)}; add runs.")
    log_n, log_d = np.log(best["N"].to_numpy(float)), np.log(best["D"].to_numpy(float))
    design = np.column_stack([np.ones(len(best)), log_n, log_d])
    lr_coef = np.linalg.lstsq(design, np.log(best["lr"].to_numpy(float)), rcond=None)[0]
    bs_tokens = best["bs"].to_numpy(float) * seq_len
    bs_coef = np.polyfit(log_d, np.log(bs_tokens), 1)
    return {"lr_coef": float(np.exp(lr_coef[0])), "lr_N_exp": float(lr_coef[1]), "lr_D_exp": float(lr_coef[2]),
            "bs_coef": float(np.exp(bs_coef[1])), "bs_D_exp": float(bs_coef[0]), "cells": int(len(best))}
