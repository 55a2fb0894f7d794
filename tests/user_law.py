"""A scaling law defined outside the package, loaded by `testbed fit --import user_law`
(tests/test_plugins.py): L(X) = E + A / X, a power law with its exponent fixed to 1."""

from __future__ import annotations

import numpy as np

from testbed.fit.laws import Law, Param, Variant, register


def _predict(theta, x):
    log_a, log_e = theta[:, 0:1], theta[:, 1:2]
    return np.logaddexp(log_a - x["logX"], np.broadcast_to(log_e, (theta.shape[0], x["logX"].size)))


INVERSE = register(Law(
    name="test_inverse",
    formula="L(X) = E + A / X",
    inputs=("X",),
    params=(
        Param("a", "A", True, (-10.0, 30.0), (0.0, 5.0, 10.0)),
        Param("e", "E", True, (-8.0, 5.0), (-1.0, 0.0, 1.0)),
    ),
    space="log",
    predict=_predict,
    variants=(Variant("free"),),
))
