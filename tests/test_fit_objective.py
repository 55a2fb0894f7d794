"""--objective asymmetric (a lower envelope) and --weight compute (large runs count more)."""

import numpy as np
import pandas as pd
import pytest

from testbed.cli import main
from testbed.errors import TestbedError
from testbed.fit.analysis import FitOptions, analyse
from testbed.fit.estimation.estimate import huber
from testbed.fit.options import asymmetry, point_weights

X = np.geomspace(1e15, 1e19, 40)


def truth(x):
    return 1.9 + 2000.0 * x**-0.2


def one_sided(seed=0):
    """Losses only ever above the law (bad seeds, unlucky runs), never below it."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"X": X, "loss": truth(X) * np.exp(np.abs(0.02 * rng.standard_normal(X.size)))})


def fitted(frame, **options):
    analysis = analyse(frame, FitOptions(law="power", **options))
    x = analysis.frame["X"].to_numpy(float)
    return analysis, analysis.result.predict({"X": x, "logX": np.log(x)})


def test_asymmetric_fit_sits_below_the_symmetric_one_near_the_envelope():
    frame = one_sided()
    _, symmetric = fitted(frame)
    analysis, envelope = fitted(frame, objective="asymmetric:20")
    assert analysis.result.asymmetry == 20.0
    assert np.all(envelope < symmetric)
    exact = truth(X)
    # The symmetric fit runs through the middle of the cloud; the asymmetric one hugs its floor.
    assert np.median(np.abs(envelope / exact - 1)) < 0.3 * np.median(np.abs(symmetric / exact - 1))
    assert np.mean(frame["loss"].to_numpy() >= envelope * (1 - 1e-3)) > 0.8
    assert analysis.summary.objective_kind == "asymmetric:20"


def test_asymmetric_objective_weights_over_predictions():
    assert asymmetry("huber") == 1.0 and asymmetry("asymmetric") == 10.0 and asymmetry("asymmetric:4") == 4.0
    for bad in ("asym", "asymmetric:0.5", "asymmetric:x", "huber:2"):
        with pytest.raises(TestbedError, match="--objective"):
            asymmetry(bad)
    # The objective at the fitted optimum is the weighted Huber sum, computed here independently.
    frame = one_sided()
    analysis, predicted = fitted(frame, objective="asymmetric:5")
    r = np.log(frame["loss"].to_numpy()) - np.log(predicted)
    expected = np.sum(np.where(r < 0, 5.0, 1.0) * huber(r, 1e-3))
    assert analysis.result.objective == pytest.approx(expected, rel=1e-9)


def test_compute_weighting_follows_the_largest_runs():
    # The largest runs sit 3% below the law the small ones follow (a break in the trend): the
    # compute-weighted fit must track them more closely than the unweighted one.
    loss = truth(X) * np.where(X > 3e18, 0.97, 1.0)
    frame = pd.DataFrame({"X": X, "loss": loss})
    weights = point_weights(frame, "compute")
    assert weights.mean() == pytest.approx(1.0) and weights[-1] / weights[0] == pytest.approx(1e4)
    _, plain = fitted(frame)
    analysis, weighted = fitted(frame, weight="compute")
    big = X > 3e18
    error_plain = np.abs(plain[big] / loss[big] - 1).mean()
    error_weighted = np.abs(weighted[big] / loss[big] - 1).mean()
    assert error_weighted < 0.5 * error_plain
    small = X < 1e16
    assert np.abs(weighted[small] / loss[small] - 1).mean() > np.abs(plain[small] / loss[small] - 1).mean()
    assert analysis.summary.weight == "compute"


def test_cli_takes_both_options(tmp_path):
    table = tmp_path / "t.csv"
    one_sided().to_csv(table, index=False)
    out = tmp_path / "o"
    assert main(["fit", str(table), "--law", "power", "--objective", "asymmetric:5", "--weight", "compute",
                 "--holdout", "largest", "--no-plots", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "asymmetric:5: over-predictions weighted 5, points weighted by compute" in report
    assert main(["fit", str(table), "--law", "power", "--objective", "lower", "--no-plots", "--out", str(out)]) == 2

