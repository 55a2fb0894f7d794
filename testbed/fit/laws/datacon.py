"""The data-constrained law of Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models").

L(N, D, U_D) = E + A / N'^alpha + B / D'^beta, with effective data and parameters
  D' = U_D + U_D·R_D*·(1 - exp(-R_D / R_D*)),  R_D = max(D / U_D - 1, 0)   (repeated epochs)
  N' = U_N + U_N·R_N*·(1 - exp(-R_N / R_N*)),  R_N = max(N / U_N - 1, 0)   (excess parameters)
  U_N = min(N, N_opt(U_D)), N_opt(U_D) = G·(U_D·G)^(beta/alpha), G = (alpha·A / (beta·B))^(1/(alpha+beta)):
the compute-optimal size for training U_D tokens once, under the law's own single-epoch part.

The published constants (E=1.87, A=521, B=1488, alpha=beta=0.353, R_D*=15.387, R_N*=5.309)
are rounded; the paper's check values (L(6.34e9, 242e9, 25e9) = 2.22564 and
L(8.67e9, 178e9, 25e9) = 2.22696) need the unrounded fit in PUBLISHED_LOG below, because the
loss is sensitive to alpha through U_N.
"""

from __future__ import annotations

import warnings

import numpy as np

from testbed.fit.laws.base import Law, Param, Variant, register

# a = log A, b = log B, e = log E, alpha, beta, R_D*, R_N* (the authors' unrounded fit)
PUBLISHED_LOG = (6.255414, 7.3049974, 0.6254804, 0.3526596, 0.3526596, 15.387756, 5.309743)


def _log_effective(log_unique, repeats, star):
    """log(U + U·R*·(1 - exp(-R/R*))), computed as log U + log1p(...) so that a vanishing U
    (extreme trial parameters) gives -inf quietly instead of log(0)."""
    return log_unique + np.log1p(star * -np.expm1(-repeats / star))


def clip_unique(tokens, unique) -> tuple[np.ndarray, int]:
    """(U clipped to D, how many rows were clipped): a run cannot have seen more unique tokens
    than tokens; the law's repetition count R_D = D/U - 1 is 0 there either way."""
    tokens, unique = np.asarray(tokens, float), np.asarray(unique, float)
    short = tokens < unique
    return np.where(short, tokens, unique), int(short.sum())


def _predict(theta, x):
    a, b, e, alpha, beta, log_rd, log_rn = (theta[:, i : i + 1] for i in range(7))
    n, d = x["N"], x["D"]
    u = clip_unique(d, x["U"])[0]  # tables are clipped (with a warning) before fitting
    rd_star, rn_star = np.exp(log_rd), np.exp(log_rn)
    log_g = (np.log(alpha) + a - np.log(beta) - b) / (alpha + beta)
    log_un = np.minimum(np.log(n), log_g + (beta / alpha) * (np.log(u) + log_g))
    r_d = d / u - 1.0
    # N / U_N from logs: U_N underflows to 0 for extreme trial parameters, N / 0 would warn.
    r_n = np.maximum(np.expm1(np.minimum(np.log(n) - log_un, 700.0)), 0.0)
    log_dp = _log_effective(np.log(u), r_d, rd_star)
    log_np = _log_effective(log_un, r_n, rn_star)
    top = np.maximum(np.maximum(a - alpha * log_np, b - beta * log_dp), e)
    return top + np.log(np.exp(a - alpha * log_np - top) + np.exp(b - beta * log_dp - top) + np.exp(e - top))


DATA_CONSTRAINED = register(Law(
    name="data_constrained",
    formula="L(N, D, U) = E + A / N'^alpha + B / D'^beta  (effective N', D' from repetition, Muennighoff et al. 2023)",
    inputs=("N", "D", "U"),
    params=(
        Param("a", "A", True, (-5.0, 40.0), (0.0, 5.0, 10.0)),
        Param("b", "B", True, (-5.0, 40.0), (0.0, 5.0, 10.0)),
        Param("e", "E", True, (-5.0, 3.0), (-0.5, 0.5)),
        Param("alpha", "alpha", False, (1e-3, 3.0), (0.2, 0.5)),
        Param("beta", "beta", False, (1e-3, 3.0), (0.2, 0.5)),
        Param("log_rd_star", "R_D*", True, (-3.0, 8.0), (1.0, 3.0)),
        Param("log_rn_star", "R_N*", True, (-3.0, 8.0), (1.0, 3.0)),
    ),
    space="log",
    predict=_predict,
    variants=(Variant("free"), Variant("tied", tied={"beta": "alpha"})),
    has_compute_frontier=False,
    terms={"N": "A / N'^alpha", "D": "B / D'^beta"},
    floor="E",
))


def published_loss(n, d, unique) -> np.ndarray:
    """The law with the authors' constants, for checks and planning."""
    d = np.atleast_1d(np.asarray(d, float))
    unique, clipped = clip_unique(d, np.atleast_1d(np.asarray(unique, float)))
    if clipped:
        warnings.warn(f"{clipped} of {unique.size} points have D < U (fewer tokens than unique tokens); "
                      f"U was clipped to D for them.", stacklevel=2)
    x = {"N": np.atleast_1d(np.asarray(n, float)), "D": d, "U": unique}
    theta = np.array(PUBLISHED_LOG[:5] + (np.log(PUBLISHED_LOG[5]), np.log(PUBLISHED_LOG[6])))
    return DATA_CONSTRAINED.predict_loss(theta, x)
