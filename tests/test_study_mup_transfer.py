"""The mup-transfer study's drift measure on simulated loss-vs-LR curves with a known optimum shift:
the vertex, the slope, the bootstrap interval's coverage, and the verdict rule."""

from __future__ import annotations

import numpy as np
import pytest

from testbed.stats import seed_noise
from testbed.study.base import Analysis, Measurement
from testbed.study.builtin import mup_transfer
from testbed.study.builtin.mup_transfer import TOLERANCE, drift_slope, lr_drift, verdict, vertex

WIDTHS = [32, 64, 128, 256]
OCTAVES = np.arange(-2, 3)  # the study's five-point grid around each width's centre


def simulate(drift: float, rng, seeds: int = 2, sd: float = 0.005, centre_drift: float = 0.0,
             curvature: float = 0.02):
    """Per width: the LR grid, the per-seed log losses and their means, for a log loss quadratic in
    log2 LR whose optimum moves by `drift` octaves per doubling of width (from log2 1e-2 at 32,
    a little off the grid), the grid centred by `centre_drift` per doubling as the study's is."""
    cells, groups = [], []
    for k, width in enumerate(WIDTHS):
        grid = np.log2(1e-2) + centre_drift * k + OCTAVES
        optimum = np.log2(1e-2) + 0.3 + drift * k
        truth = 1.5 + curvature * (grid - optimum) ** 2
        runs = truth[None, :] + sd * rng.standard_normal((seeds, len(grid)))
        groups += [np.exp(runs[:, j]) for j in range(len(grid))]
        cells.append({"width": width, "lrs": 2.0 ** grid, "losses": runs.mean(axis=0),
                      "seeds": np.full(len(grid), float(seeds))})
    return cells, seed_noise(groups)


def test_vertex_finds_a_parabola_minimum_and_stays_on_the_grid_at_its_edges():
    grid = np.array([-3.0, -2.0, -1.0, 0.0])
    assert vertex(grid, (grid + 1.6) ** 2)[0] == pytest.approx(-1.6)
    assert vertex(grid, (grid + 5.0) ** 2)[0] == -3.0  # lowest LR best: the edge itself
    assert vertex(grid, np.array([3.0, 1.0, 2.0, np.inf]))[0] == pytest.approx(-2.0 + (3 - 2) / (2 * (3 - 2 * 1 + 2)))
    assert vertex(grid, np.array([3.0, 2.0, 1.0, np.nan]))[0] == -1.0  # beside a diverged run: the point
    assert drift_slope(np.log2(WIDTHS), -np.log2(WIDTHS))[0] == pytest.approx(-1.0)


@pytest.mark.parametrize("drift, centre_drift", [(0.0, 0.0), (-1.0, -1.0), (-1.0, -0.5), (-0.5, -0.5)])
def test_drift_recovers_a_known_shift_without_noise(drift, centre_drift):
    cells, _ = simulate(drift, np.random.default_rng(0), sd=0.0, centre_drift=centre_drift)
    assert lr_drift(cells, None).value == pytest.approx(drift, abs=1e-9)


@pytest.mark.parametrize("drift, centre_drift", [(0.0, 0.0), (-1.0, -1.0)])
def test_drift_interval_covers_the_true_shift(drift, centre_drift):
    """Coverage of the parametric bootstrap on simulated studies (two seeds, noise comparable to the
    losses' curvature over one grid step): near 95%, and never far below."""
    rng = np.random.default_rng(1)
    studies, covered, widths = 150, 0, []
    for n in range(studies):
        cells, noise = simulate(drift, rng, centre_drift=centre_drift)
        estimate = lr_drift(cells, noise, draws=400, seed=n)
        covered += estimate.low <= drift <= estimate.high
        widths.append(estimate.high - estimate.low)
    assert covered / studies >= 0.9, covered / studies
    assert np.median(widths) < 2 * TOLERANCE  # tight enough for the rule to decide


def test_verdict_rule():
    def analysis(mup, sp, caveat=""):
        return Analysis(Measurement("µP drift", *mup), [Measurement("SP drift", *sp, caveat=caveat)])

    assert verdict(analysis((0.05, -0.1, 0.2), (-1.0, -1.3, -0.7)))[0] == "agree"
    assert verdict(analysis((-0.8, -1.0, -0.6), (-1.0, -1.3, -0.7)))[0] == "disagree"
    assert verdict(analysis((0.0, -0.3, 0.3), (-1.0, -1.3, -0.7)))[0] == "inconclusive"  # straddles 0.25
    assert verdict(analysis((0.0, -0.1, 0.1), (0.5, 0.2, 0.8)))[0] == "disagree"  # SP's optimum rises
    assert verdict(analysis((0.0, -0.1, 0.1), (-1.0, -1.3, -0.7), caveat="LR at the edge"))[0] == "inconclusive"


def test_sweeps_share_the_base_width_and_bracket_sp_drift():
    for size in ("tiny", "cpu", "gpu"):
        sp, mup = mup_transfer.sweeps(size)
        assert (sp["name"], mup["name"]) == ("mup-transfer-sp", "mup-transfer-mup")
        assert mup["zip"]["model.d_model"] == sp["zip"]["model.d_model"][1:]  # µP = SP at the base width
        assert mup["base"]["model"]["mup_base_width"] == sp["zip"]["model.d_model"][0]
        centres = np.log2(sp["zip"]["labels.centre"])
        assert np.allclose(np.diff(centres), -np.diff(np.log2(sp["zip"]["model.d_model"])))  # 1/width
