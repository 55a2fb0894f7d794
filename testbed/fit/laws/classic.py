"""The classic scaling laws: Chinchilla (Hoffmann et al.), Kaplan et al. and a plain power law,
each registered in `testbed.fit.laws.base.LAWS` on import."""

from __future__ import annotations

import numpy as np

from testbed.fit.laws.base import Law, Param, Variant, _col, _softmax_lse, register


# ---------------------------------------------------------------- Chinchilla (Hoffmann et al.)
def _chinchilla_predict(theta, x):
    lse, _ = _softmax_lse(
        _col(theta, 0) - _col(theta, 3) * x["logN"],
        _col(theta, 1) - _col(theta, 4) * x["logD"],
        np.broadcast_to(_col(theta, 2), (theta.shape[0], x["logN"].size)),
    )
    return lse


def _chinchilla_jacobian(theta, x):
    _, (w_n, w_d, w_e) = _softmax_lse(
        _col(theta, 0) - _col(theta, 3) * x["logN"],
        _col(theta, 1) - _col(theta, 4) * x["logD"],
        np.broadcast_to(_col(theta, 2), (theta.shape[0], x["logN"].size)),
    )
    return np.stack([w_n, w_d, w_e, -w_n * x["logN"], -w_d * x["logD"]], axis=-1)


CHINCHILLA = Law(
    name="chinchilla",
    formula="L(N, D) = E + A / N^alpha + B / D^beta",
    inputs=("N", "D"),
    params=(
        Param("a", "A", True, (-5.0, 40.0), (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)),
        Param("b", "B", True, (-5.0, 40.0), (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)),
        Param("e", "E", True, (-5.0, 3.0), (-1.0, -0.5, 0.0, 0.5, 1.0)),
        Param("alpha", "alpha", False, (0.0, 3.0), (0.0, 0.5, 1.0, 1.5, 2.0)),
        Param("beta", "beta", False, (0.0, 3.0), (0.0, 0.5, 1.0, 1.5, 2.0)),
    ),
    space="log",
    predict=_chinchilla_predict,
    jacobian=_chinchilla_jacobian,
    variants=(Variant("free"), Variant("tied", tied={"beta": "alpha"}), Variant("fixed_E", fixed=("E",))),
    has_compute_frontier=True,
    terms={"N": "A / N^alpha", "D": "B / D^beta"},
    floor="E",
)


# ---------------------------------------------------------------- Kaplan et al. 2020
def _kaplan_terms(theta, x):
    ratio = _col(theta, 2) / _col(theta, 3)
    u_n = ratio * (_col(theta, 0) - x["logN"])
    u_d = np.broadcast_to(_col(theta, 1) - x["logD"], u_n.shape)
    return u_n, u_d


def _kaplan_predict(theta, x):
    lse, _ = _softmax_lse(*_kaplan_terms(theta, x))
    return _col(theta, 3) * lse


def _kaplan_jacobian(theta, x):
    u_n, u_d = _kaplan_terms(theta, x)
    lse, (w_n, w_d) = _softmax_lse(u_n, u_d)
    alpha_n, alpha_d = _col(theta, 2), _col(theta, 3)
    return np.stack(
        [alpha_n * w_n, alpha_d * w_d, w_n * (_col(theta, 0) - x["logN"]), lse - w_n * u_n], axis=-1
    )


KAPLAN = Law(
    name="kaplan",
    formula="L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D",
    inputs=("N", "D"),
    params=(
        Param("log_nc", "N_c", True, (0.0, 80.0), (10.0, 20.0, 30.0, 40.0)),
        Param("log_dc", "D_c", True, (0.0, 80.0), (10.0, 20.0, 30.0, 40.0)),
        Param("alpha_n", "alpha_N", False, (1e-4, 3.0), (0.05, 0.1, 0.3, 0.6)),
        Param("alpha_d", "alpha_D", False, (1e-4, 3.0), (0.05, 0.1, 0.3, 0.6)),
    ),
    space="log",
    predict=_kaplan_predict,
    jacobian=_kaplan_jacobian,
    has_compute_frontier=True,
    terms={"N": "(N_c / N)^(alpha_N / alpha_D)", "D": "D_c / D"},
)


# ---------------------------------------------------------------- power law with offset
def _power_terms(theta, x):
    return (
        _col(theta, 0) - _col(theta, 1) * x["logX"],
        np.broadcast_to(_col(theta, 2), (theta.shape[0], x["logX"].size)),
    )


def _power_predict(theta, x):
    return _softmax_lse(*_power_terms(theta, x))[0]


def _power_jacobian(theta, x):
    _, (w_x, w_e) = _softmax_lse(*_power_terms(theta, x))
    return np.stack([w_x, -w_x * x["logX"], w_e], axis=-1)


POWER = Law(
    name="power",
    formula="L(X) = E + A / X^alpha   (X: steps, tokens or compute)",
    inputs=("X",),
    params=(
        Param("a", "A", True, (-10.0, 60.0), (0.0, 5.0, 10.0, 20.0)),
        Param("alpha", "alpha", False, (0.0, 3.0), (0.1, 0.3, 0.6, 1.0)),
        Param("e", "E", True, (-8.0, 5.0), (-1.0, 0.0, 1.0)),
    ),
    space="log",
    predict=_power_predict,
    jacobian=_power_jacobian,
    variants=(Variant("free"), Variant("fixed_E", fixed=("E",))),
    terms={"X": "A / X^alpha"},
    floor="E",
)


for _law in (CHINCHILLA, KAPLAN, POWER):
    register(_law)
