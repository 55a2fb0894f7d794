"""Guards against silent bad fits, held-out prediction intervals, and analyses only where the
data fit them."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from testbed.cli import main
from testbed.errors import TestbedError
from testbed.fit.analysis import FitOptions, analyse
from testbed.fit.estimation.bootstrap import bootstrap
from testbed.fit.estimation.estimate import fit
from testbed.fit.laws import POWER, features
from testbed.fit.protocols.approaches import approach2


def grid(sizes=(1e7, 3e7, 1e8, 3e8), ratios=(10, 20, 40), noise=0.002, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"N": n, "D": r * n} for n in sizes for r in ratios]
    frame = pd.DataFrame(rows)
    frame["loss"] = (1.8 + 400 / frame["N"] ** 0.34 + 1500 / frame["D"] ** 0.36) * np.exp(noise * rng.standard_normal(len(frame)))
    return frame


def test_a_single_model_size_is_an_error_naming_the_term():
    frame = grid(sizes=(1e8,), ratios=(5, 10, 20, 40, 80, 160, 320))
    with pytest.raises(TestbedError, match=r"single N \(1e\+08\), so the term A / N\^alpha .* cannot be identified"):
        analyse(frame, FitOptions())


def test_d_below_u_is_clipped_with_a_warning():
    frame = grid().assign(U=lambda f: f["D"] * np.where(np.arange(len(f)) < 3, 2.0, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's divide/log warnings would fail here
        analysis = analyse(frame, FitOptions(law="data_constrained", allocation="no"))
    assert [w for w in analysis.summary.warnings if "D < U" in w] == [
        "3 rows have D < U (fewer tokens seen than unique tokens); U was clipped to D for them. "
        "Check the U column (--columns U=COLUMN)."]
    assert (analysis.frame["U"] <= analysis.frame["D"]).all()


def test_published_data_constrained_loss_clips_u_with_one_warning():
    from testbed.fit.laws.datacon import published_loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clipped = published_loss([1e8, 1e9], [1e9, 1e10], [2e9, 1e9])
    assert [str(w.message) for w in caught] == [
        "1 of 2 points have D < U (fewer tokens than unique tokens); U was clipped to D for them."]
    # U clipped to D is a single epoch of D tokens: the same loss as U = D.
    assert clipped[0] == pytest.approx(published_loss([1e8], [1e9], [1e9])[0], rel=1e-12)


def test_bounds_option_and_at_bound_tolerance(tmp_path):
    frame = grid()
    analysis = analyse(frame, FitOptions(bounds={"alpha": (0.5, 1.0)}, allocation="no"))
    assert analysis.summary.params["alpha"] == pytest.approx(0.5, abs=1e-3)
    assert "alpha" in analysis.summary.at_bound
    assert any("--bounds" in w for w in analysis.summary.warnings)
    with pytest.raises(TestbedError, match="--bounds alpha=1:0.5 is empty"):
        analyse(frame, FitOptions(bounds={"alpha": (1.0, 0.5)}))
    with pytest.raises(TestbedError, match="no parameter 'gamma'"):
        analyse(frame, FitOptions(bounds={"gamma": (0.0, 1.0)}))
    table = tmp_path / "t.csv"
    frame.to_csv(table, index=False)
    assert main(["fit", str(table), "--bounds", "alpha", "--out", str(tmp_path / "o")]) == 2


def test_flat_parameters_are_reported():
    x_values = np.logspace(1, 3, 12)
    loss = np.full(12, 2.0) * np.exp(1e-4 * np.random.default_rng(0).standard_normal(12))  # no X dependence
    result = fit(POWER, features(POWER, {"X": x_values}), loss)
    assert result.flat  # the constant is split between E and A/X^0 in any proportion
    clean = 1.5 + 3 / x_values**0.5
    assert fit(POWER, features(POWER, {"X": x_values}), clean).flat == []
    frame = pd.DataFrame({"X": x_values, "loss": loss})
    analysis = analyse(frame, FitOptions(law="power"))
    assert analysis.summary.flat and any("objective is flat in" in w for w in analysis.summary.warnings)


def test_prediction_intervals_for_every_held_out_point(tmp_path):
    frame = grid(sizes=(1e7, 2e7, 5e7, 1e8, 2e8, 5e8, 1e9), noise=0.003)
    frame.to_csv(tmp_path / "t.csv", index=False)
    assert main(["fit", str(tmp_path / "t.csv"), "--holdout", "largest-N", "--no-plots", "--out", str(tmp_path / "o")]) == 0
    saved = json.loads((tmp_path / "o" / "fit.json").read_text())
    assert len(saved["holdout"]) == 3
    for row in saved["holdout"]:
        assert row["pi_low"] < row["predicted"] < row["pi_high"]
        assert row["pi_high"] - row["pi_low"] > 2 * 0.003 * row["loss"]  # at least the residual noise
    assert saved["prediction_interval"]["resamples"] > 50
    assert "95% prediction interval" in (tmp_path / "o" / "report.md").read_text()


def test_robust_spread_ignores_a_few_wild_replicates():
    x_values = np.repeat(np.logspace(1, 4, 8), 2)
    truth = np.array([np.log(3.0), 0.5, np.log(1.5)])
    x = features(POWER, {"X": x_values})
    loss = POWER.predict_loss(truth, x) * np.exp(0.01 * np.random.default_rng(1).standard_normal(len(x_values)))
    frame = pd.DataFrame({"X": x_values, "loss": loss, "run_id": np.arange(len(x_values)).astype(str)})
    intervals, samples = bootstrap(fit(POWER, x, loss, delta=0.05), frame, 200, delta=0.05, seed=0)
    values = samples["A"].to_numpy()
    p16, p84 = np.percentile(values, [15.865, 84.135])
    assert intervals["A"].se == pytest.approx((p84 - p16) / 2)
    assert intervals["A"].sd == pytest.approx(values.std(ddof=1))


def test_allocation_only_for_isoflop_shaped_data(tmp_path):
    ladder = grid(sizes=(1e7, 2e7, 5e7, 1e8, 2e8), ratios=(5, 20, 80))
    plain = analyse(ladder, FitOptions())
    assert plain.summary.derived is None and plain.summary.approach2 is None
    assert "not IsoFLOP-shaped" in plain.summary.allocation_skipped
    asked = analyse(ladder, FitOptions(allocation="yes"))
    assert asked.summary.derived is not None
    rows = []
    for budget in (1e17, 1e18, 1e19):
        for n in np.exp(np.linspace(np.log(budget / 6) * 0.35, np.log(budget / 6) * 0.5, 5)):
            rows.append({"N": n, "D": budget / (6 * n), "C": budget})
    isoflop = pd.DataFrame(rows).assign(loss=lambda f: 1.8 + 400 / f["N"] ** 0.34 + 1500 / f["D"] ** 0.36)
    assert analyse(isoflop, FitOptions()).summary.derived is not None
    # Two N values per budget: skipped without numpy's RankWarning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert approach2(pd.concat([isoflop.iloc[:2]] * 3).assign(C=1e17)) is None
