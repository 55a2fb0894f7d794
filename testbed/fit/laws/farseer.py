"""The Farseer law of Li et al. 2025 ("Predictable Scale: Part II, Farseer: A Refined Scaling Law
in Large Language Models"): a loss surface whose data exponent depends on model size.

    L(N, D) = exp(a3·N^gamma3 + b3) + exp(a2·N^gamma2 + b2) · D^(-exp(a1·N^gamma1 + b1))

The first term is the loss with unlimited data (a stretched exponential in N: it tends to
exp(b3) as N grows when gamma3 < 0); the second is a power law in D whose coefficient
B(N) = exp(a2·N^gamma2 + b2) and exponent A(N) = exp(a1·N^gamma1 + b1) both move with N, the
interaction Chinchilla's separable form cannot express. N and D are used as given (parameters and
tokens), as in the paper. The paper fits the terms stage by stage (differential piecewise
fitting); here all nine parameters are fitted together by the common estimator.
"""

from __future__ import annotations

import numpy as np

from testbed.fit.laws.base import Law, Param, _softmax_lse, register


def _pieces(theta, x):
    a1, b1, g1, a2, b2, g2, a3, b3, g3 = (theta[:, i : i + 1] for i in range(9))
    log_n, log_d = x["logN"], x["logD"]
    n_g1, n_g2, n_g3 = np.exp(g1 * log_n), np.exp(g2 * log_n), np.exp(g3 * log_n)
    floor = a3 * n_g3 + b3  # log of the unlimited-data loss
    exponent = np.exp(a1 * n_g1 + b1)  # A(N), the data exponent
    data = a2 * n_g2 + b2 - exponent * log_d  # log of B(N)·D^(-A(N))
    return floor, data, exponent, (a1, a2, a3, n_g1, n_g2, n_g3)


def _predict(theta, x):
    floor, data, _, _ = _pieces(theta, x)
    return _softmax_lse(floor, data)[0]


def _jacobian(theta, x):
    floor, data, exponent, (a1, a2, a3, n_g1, n_g2, n_g3) = _pieces(theta, x)
    _, (w_floor, w_data) = _softmax_lse(floor, data)
    log_n, log_d = x["logN"], x["logD"]
    d_exponent = -w_data * log_d * exponent  # d log L / d (a1·N^gamma1 + b1)
    return np.stack([
        d_exponent * n_g1, d_exponent, d_exponent * a1 * n_g1 * log_n,
        w_data * n_g2, w_data, w_data * a2 * n_g2 * log_n,
        w_floor * n_g3, w_floor, w_floor * a3 * n_g3 * log_n,
    ], axis=-1)


def data_exponent(params: dict, n) -> np.ndarray:
    """A(N) = exp(a1·N^gamma1 + b1): the exponent of D at model size N."""
    return np.exp(params["a1"] * np.asarray(n, float) ** params["gamma1"] + params["b1"])


FARSEER = register(Law(
    name="farseer",
    formula="L(N, D) = exp(a3 N^gamma3 + b3) + exp(a2 N^gamma2 + b2) * D^(-exp(a1 N^gamma1 + b1))",
    inputs=("N", "D"),
    params=(
        Param("a1", "a1", False, (-50.0, 50.0), (-1.0, 1.0)),
        Param("b1", "b1", False, (-10.0, 5.0), (-1.5, -0.5)),
        Param("gamma1", "gamma1", False, (-1.0, 1.0), (-0.1, 0.1)),
        Param("a2", "a2", False, (-200.0, 200.0), (-1.0, 1.0)),
        Param("b2", "b2", False, (-20.0, 60.0), (5.0, 15.0)),
        Param("gamma2", "gamma2", False, (-1.0, 1.0), (-0.1, 0.1)),
        Param("a3", "a3", False, (-200.0, 200.0), (1.0, 10.0)),
        Param("b3", "b3", False, (-5.0, 5.0), (0.3, 0.8)),
        Param("gamma3", "gamma3", False, (-2.0, 0.5), (-0.3, -0.1)),
    ),
    space="log",
    predict=_predict,
    jacobian=_jacobian,
    refine_iterations=1000,
    has_compute_frontier=True,
    terms={"N": "exp(a3 N^gamma3 + b3)", "D": "D^(-exp(a1 N^gamma1 + b1))"},
))
