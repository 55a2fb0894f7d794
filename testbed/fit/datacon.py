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

import numpy as np

from testbed.fit.lawbase import Law, Param, Variant, register

# a = log A, b = log B, e = log E, alpha, beta, R_D*, R_N* (the authors' unrounded fit)
PUBLISHED_LOG = (6.255414, 7.3049974, 0.6254804, 0.3526596, 0.3526596, 15.387756, 5.309743)


def _effective(unique, repeats, star):
    return unique + unique * star * (1.0 - np.exp(-repeats / star))


def _predict(theta, x):
    a, b, e, alpha, beta, log_rd, log_rn = (theta[:, i : i + 1] for i in range(7))
    n, d, u = x["N"], x["D"], x["U"]
    rd_star, rn_star = np.exp(log_rd), np.exp(log_rn)
    log_g = (np.log(alpha) + a - np.log(beta) - b) / (alpha + beta)
    log_un = np.minimum(np.log(n), log_g + (beta / alpha) * (np.log(u) + log_g))
    u_n = np.exp(log_un)
    r_d = np.maximum(d / u - 1.0, 0.0)
    r_n = np.maximum(n / u_n - 1.0, 0.0)
    log_dp = np.log(_effective(u, r_d, rd_star))
    log_np = np.log(_effective(u_n, r_n, rn_star))
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
))


def published_loss(n, d, unique) -> np.ndarray:
    """The law with the authors' constants, for checks and planning."""
    x = {"N": np.atleast_1d(np.asarray(n, float)), "D": np.atleast_1d(np.asarray(d, float)),
         "U": np.atleast_1d(np.asarray(unique, float))}
    theta = np.array(PUBLISHED_LOG[:5] + (np.log(PUBLISHED_LOG[5]), np.log(PUBLISHED_LOG[6])))
    return DATA_CONSTRAINED.predict_loss(theta, x)
