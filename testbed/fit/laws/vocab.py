"""The vocabulary law of Tao et al. 2024 ("Scaling Laws with Vocabulary"), fitted on raw loss.

Lu = -E + A1 / Nnv^alpha1 + A2 / (V·d)^alpha2 + B / Dtok^beta, with alpha1 = beta, where Lu is the
unigram-normalised loss (negative), Nnv the non-vocabulary parameters, V the vocabulary size,
d the embedding width and Dtok the training tokens, obtained from the training characters H
through the authors' fitted tokens-per-character curve:
  Dtok = H · (0.00639222·ln²V - 0.15811069·lnV + 1.20470122).
Units follow the authors: Nnv / 1e6, V / 1e3 (also inside ln), d / 1e3, H / 1e9.
"""

from __future__ import annotations

import numpy as np

from testbed.fit.laws.base import Law, Param, Variant, register

PUBLISHED = {"A1": 1.8314, "A2": 0.19584, "B": 2.1241, "E": 5.5328, "beta": 0.44661, "alpha2": 0.67074}


def tokens_from_characters(characters, vocab):
    """Training tokens for H characters at vocabulary V (both in raw units)."""
    log_v = np.log(np.asarray(vocab, float) / 1e3)
    return np.asarray(characters, float) * (0.00639222 * log_v**2 - 0.15811069 * log_v + 1.20470122)


def _prepare(frame) -> dict:
    nnv = np.asarray(frame["Nnv"], float) / 1e6
    v = np.asarray(frame["V"], float)
    d = np.asarray(frame["d"], float)
    dtok = tokens_from_characters(np.asarray(frame["H"], float) / 1e9, v)
    return {"logNnv": np.log(nnv), "logVd": np.log(v / 1e3 * d / 1e3), "logDtok": np.log(dtok)}


def _predict(theta, x):
    log_a1, log_a2, log_b, e, beta, alpha2 = (theta[:, i : i + 1] for i in range(6))
    return (
        -e
        + np.exp(log_a1 - beta * x["logNnv"])
        + np.exp(log_a2 - alpha2 * x["logVd"])
        + np.exp(log_b - beta * x["logDtok"])
    )


def _jacobian(theta, x):
    log_a1, log_a2, log_b, e, beta, alpha2 = (theta[:, i : i + 1] for i in range(6))
    t1 = np.exp(log_a1 - beta * x["logNnv"])
    t2 = np.exp(log_a2 - alpha2 * x["logVd"])
    t3 = np.exp(log_b - beta * x["logDtok"])
    return np.stack(
        [t1, t2, t3, -np.ones_like(t1), -t1 * x["logNnv"] - t3 * x["logDtok"], -t2 * x["logVd"]], axis=-1
    )


VOCAB = register(Law(
    name="vocab",
    formula="Lu = -E + A1 / Nnv^beta + A2 / (V d)^alpha2 + B / Dtok^beta   (Tao et al. 2024)",
    inputs=("Nnv", "V", "d", "H"),
    params=(
        Param("log_a1", "A1", True, (-10.0, 10.0), (-1.0, 0.5, 2.0)),
        Param("log_a2", "A2", True, (-10.0, 10.0), (-2.0, -0.5, 1.0)),
        Param("log_b", "B", True, (-10.0, 10.0), (-1.0, 0.5, 2.0)),
        Param("e", "E", False, (0.0, 20.0), (2.0, 5.0, 8.0)),
        # The authors keep 0.1 < beta, alpha2 < 1.
        Param("beta", "beta", False, (0.1, 1.0), (0.2, 0.5, 0.8)),
        Param("alpha2", "alpha2", False, (0.1, 1.0), (0.3, 0.7)),
    ),
    space="raw",
    predict=_predict,
    jacobian=_jacobian,
    prepare=_prepare,
    positive=("Nnv", "V", "d", "H"),
    variants=(Variant("free"),),
))

