"""Step Law hyperparameter rules (Li et al. 2025, "Predictable Scale: Part I").

lr_opt(N, D) = 1.79 · N^-0.713 · D^0.307 and bs_opt(D) = 0.58 · D^0.571 (batch size in tokens),
with N the non-embedding parameters and D the training tokens. Plain functions so a sweep
planner can call them; `refit` re-derives the constants from a table of (N, D, lr, bs, loss) runs.
"""

from __future__ import annotations

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
