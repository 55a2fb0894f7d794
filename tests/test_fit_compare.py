"""Compute multipliers between ablation variants."""

import numpy as np
import pandas as pd
import pytest

from testbed.fit.analysis import FitOptions, analyse
from testbed.fit.laws import CHINCHILLA, features
from testbed.fit.protocols.variants import compute_multiplier, crossings

BASE = np.array([np.log(400.0), np.log(1500.0), np.log(1.8), 0.34, 0.36])


def scaled(k):
    """The baseline law with N and D both k times larger: a variant worth k^2 times the compute."""
    return BASE - np.array([BASE[3] * np.log(k), BASE[4] * np.log(k), 0, 0, 0])


def test_multiplier_of_a_uniformly_better_variant_is_exact():
    multiplier = compute_multiplier(CHINCHILLA, BASE, scaled(2.0), [1e18, 1e21])
    assert multiplier == pytest.approx([4.0, 4.0], rel=1e-3)
    assert crossings(CHINCHILLA, BASE, scaled(2.0), 1e15, 1e24) == []


def test_by_label_fits_each_variant_and_reports_the_multiplier():
    rng = np.random.default_rng(0)
    rows = []
    for label, theta in (("base", BASE), ("better", scaled(1.5))):
        for budget in np.logspace(16, 19, 4):
            for n in np.exp(np.linspace(np.log(budget / 6) * 0.35, np.log(budget / 6) * 0.5, 5)):
                d = budget / (6 * n)
                loss = CHINCHILLA.predict_loss(theta, features(CHINCHILLA, {"N": [n], "D": [d]}))[0]
                rows.append({"N": n, "D": d, "loss": loss * np.exp(0.001 * rng.standard_normal()), "label_norm": label})
    analysis = analyse(pd.DataFrame(rows), FitOptions(by="label_norm", baseline="base", bootstrap=10, budgets=[1e19]))
    row = analysis.summary.comparisons["better"]["multiplier"][0]
    assert row["multiplier"] == pytest.approx(2.25, rel=0.15)
    assert row["low"] <= row["multiplier"] <= row["high"]
