"""The Farseer law: its data exponent moves with N; a fit to simulated runs recovers the surface
and extrapolates to ten times the largest model."""

import numpy as np
import pytest

from testbed.fit.analysis import FitOptions, analyse
from testbed.fit.estimation.estimate import fit
from testbed.fit.laws import features
from testbed.fit.laws.farseer import FARSEER, data_exponent

TRUE = dict(a1=0.05, b1=-1.3, gamma1=0.1, a2=1.0, b2=5.4, gamma2=0.05, a3=12.0, b3=0.6, gamma3=-0.2)
THETA = np.array([TRUE[p.public] for p in FARSEER.params])
SIZES = (2e7, 5e7, 1e8, 2e8, 5e8, 1e9)
RATIOS = (5, 10, 20, 40, 80, 160)


def surface(n, d):
    """The law written out directly (not through the fitter's log-sum-exp)."""
    n, d = np.asarray(n, float), np.asarray(d, float)
    floor = np.exp(TRUE["a3"] * n ** TRUE["gamma3"] + TRUE["b3"])
    coef = np.exp(TRUE["a2"] * n ** TRUE["gamma2"] + TRUE["b2"])
    return floor + coef * d ** -np.exp(TRUE["a1"] * n ** TRUE["gamma1"] + TRUE["b1"])


def ladder(noise, seed=0):
    rng = np.random.default_rng(seed)
    n = np.repeat(SIZES, len(RATIOS))
    d = n * np.tile(RATIOS, len(SIZES))
    return n, d, surface(n, d) * np.exp(noise * rng.standard_normal(n.size))


def test_law_matches_the_paper_form_and_its_exponent_grows_with_n():
    n, d, loss = ladder(0.0)
    assert FARSEER.predict_loss(THETA, features(FARSEER, {"N": n, "D": d})) == pytest.approx(loss, rel=1e-12)
    exponents = data_exponent(TRUE, [1e8, 1e9, 1e10])
    assert exponents == pytest.approx(np.exp(0.05 * np.array([1e8, 1e9, 1e10]) ** 0.1 - 1.3))
    assert np.all(np.diff(exponents) > 0.02)  # what a Chinchilla fit, with one beta, cannot follow


def test_fit_recovers_the_surface_and_extrapolates_to_larger_models():
    n, d, loss = ladder(0.0)
    result = fit(FARSEER, features(FARSEER, {"N": n, "D": d}), loss)
    assert result.objective < 1e-9
    for name, value in TRUE.items():
        assert result.params[name] == pytest.approx(value, rel=0.05, abs=0.01), name
    n, d, noisy = ladder(0.002)
    result = fit(FARSEER, features(FARSEER, {"N": n, "D": d}), noisy)
    big_n = np.full(4, 1e10)  # ten times the largest fitted model
    big_d = big_n * np.array([5, 20, 80, 160])
    predicted = result.predict(features(FARSEER, {"N": big_n, "D": big_d}))
    assert np.max(np.abs(predicted / surface(big_n, big_d) - 1)) < 0.01
    assert data_exponent(result.params, 1e9) == pytest.approx(data_exponent(TRUE, 1e9), rel=0.1)


def test_farseer_beats_chinchilla_on_the_largest_model_held_out():
    import pandas as pd

    n, d, loss = ladder(0.001)
    frame = pd.DataFrame({"run_id": [f"r{i}" for i in range(n.size)], "N": n, "D": d, "loss": loss})
    errors = {law: analyse(frame, FitOptions(law=law, holdout="largest-N", allocation="no"))
              .summary.mean_abs_rel_error for law in ("farseer", "chinchilla")}
    assert errors["farseer"] < 0.5 * errors["chinchilla"]
