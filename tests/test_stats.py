"""Every interval method of testbed.stats against simulations with a known answer: its coverage,
measured over many simulated studies, lies within a few points of nominal; and the methods it
replaced are shown to fail the same check."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from testbed.stats import paired_noise, relative_gap, seed_noise, spread
from testbed.stats.choice import CROSS_FIT, IN_SAMPLE, choose_lr
from testbed.stats.curves import budget_multipliers, compute_multiplier, isoflop_slope, percentile
from testbed.stats.intervals import mean_interval


def covered(estimates, truth) -> float:
    return float(np.mean([e.low <= truth <= e.high for e in estimates]))


def test_pooled_seed_intervals_cover_where_a_two_seed_bootstrap_does_not():
    """Six cells of two seeds per arm, a known 2% gap in one cell: the pooled t interval covers
    about 95%; a percentile bootstrap of the cell's two seeds covers far less."""
    rng = np.random.default_rng(1)
    sd, gap, sims = 0.01, 0.02, 2000
    ours, naive = [], []
    for _ in range(sims):
        base = 3.0 * np.exp(sd * rng.standard_normal((6, 2)))
        arm = 3.0 * (1 + gap) * np.exp(sd * rng.standard_normal((6, 2)))
        noise = seed_noise([*base, *arm])
        ours.append(relative_gap(arm[0], base[0], noise))
        if len(naive) >= 300:
            continue
        draws = [(np.mean(arm[0][rng.integers(0, 2, 2)]) / np.mean(base[0][rng.integers(0, 2, 2)]) - 1)
                 for _ in range(200)]
        naive.append(type("E", (), {"low": np.percentile(draws, 2.5), "high": np.percentile(draws, 97.5)}))
    assert noise is not None and noise.df == 12
    assert 0.93 <= covered(ours, gap) <= 0.97
    assert covered(naive, gap) < 0.8  # the method the studies used before


def test_paired_gap_cancels_shared_seed_noise_and_covers():
    """Arms sharing a seed share most of its noise (same initialisation and data order): the
    paired interval covers at nominal and is much narrower than the unpaired one."""
    rng = np.random.default_rng(2)
    gap, sims = -0.01, 2000
    paired, unpaired = [], []
    for _ in range(sims):
        shared = 0.02 * rng.standard_normal((4, 2))
        base = 3.0 * np.exp(shared + 0.003 * rng.standard_normal((4, 2)))
        arm = 3.0 * (1 + gap) * np.exp(shared + 0.003 * rng.standard_normal((4, 2)))
        noise = paired_noise(zip(arm, base))
        paired.append(relative_gap(arm[0], base[0], noise, paired=True))
        unpaired.append(relative_gap(arm[0], base[0], seed_noise([*arm, *base])))
    assert 0.93 <= covered(paired, gap) <= 0.97
    width = np.mean([e.high - e.low for e in paired]) / np.mean([e.high - e.low for e in unpaired])
    assert width < 0.3
    assert "paired by seed" in paired[0].method


def test_gap_without_any_replicate_has_no_interval():
    e = relative_gap([3.1], [3.0])
    assert e.value == pytest.approx(3.1 / 3.0 - 1) and not e.has_interval and "no interval" in e.method


def test_mean_interval_covers():
    rng = np.random.default_rng(3)
    truth, sims, results = 0.02, 2000, []
    for _ in range(sims):
        cells = truth + 0.005 * rng.standard_normal((5, 2))
        results.append(mean_interval(cells[0], seed_noise(cells, log=False)))
    assert 0.93 <= covered(results, truth) <= 0.97


def test_spread_covers_a_clear_spread():
    rng = np.random.default_rng(4)
    levels = np.array([3.0, 3.06, 3.09, 3.15])  # a true spread of 5%
    truth, results = levels.max() / levels.min() - 1, []
    for _ in range(600):
        groups = [lv * np.exp(0.01 * rng.standard_normal(2)) for lv in levels]
        results.append(spread(groups, draws=1000, seed=int(rng.integers(1 << 30))))
    assert 0.91 <= covered(results, truth) <= 0.99


def isoflop_points(rng, a=0.5, sd=0.005, sizes_per_budget=5, top_shift=0.0):
    """Three budgets a factor 3 apart; each budget's parabola has its vertex at v0 + a·log C."""
    budgets = np.array([1e12, 3e12, 1e13])
    rows = []
    for c in budgets:
        vertex = math.log(1e5) + a * math.log(c / 3e12)
        shift = top_shift if c == budgets[-1] else 0.0
        for offset in np.linspace(-1.2, 1.2, sizes_per_budget) + shift:
            log_n = vertex + offset + 0.1
            rows.append((math.exp(log_n), 3.0 - 0.1 * math.log(c / 1e12) + 0.08 * (log_n - vertex) ** 2
                         + sd * rng.standard_normal(), c))
    return [np.array(col) for col in zip(*rows)]


def test_joint_isoflop_slope_recovers_a_and_covers():
    rng = np.random.default_rng(5)
    results = []
    for _ in range(1000):
        n, loss, c = isoflop_points(rng)
        estimate, fit, info = isoflop_slope(n, loss, c, draws=200)
        assert fit is not None and info["inside"]
        results.append(estimate)
    assert abs(np.median([e.value for e in results]) - 0.5) < 0.03
    assert 0.93 <= covered(results, 0.5) <= 0.97


def test_isoflop_optimum_outside_the_sizes_is_a_caveat_not_a_result():
    rng = np.random.default_rng(6)
    n, loss, c = isoflop_points(rng, sd=0.001, top_shift=-1.5)  # the top budget's sizes all below its optimum
    estimate, _, info = isoflop_slope(n, loss, c)
    assert not info["inside"] and info["vertices_N"][-1] > n[c == c.max()].max()
    assert "outside the sampled sizes" in estimate.caveat


def frontier(rng, budgets, alpha, offset, sd):
    base = np.exp(1.5 - alpha * np.log(budgets / budgets[0]) + sd * rng.standard_normal(len(budgets)))
    return base, base * np.exp(offset + sd * rng.standard_normal(len(budgets)))


def test_paired_compute_multiplier_covers_and_sees_a_consistent_gap():
    rng = np.random.default_rng(7)
    budgets = np.array([4e11, 1e12, 2.5e12, 6e12])
    alpha, offset = 0.14, 0.06  # the variant is 6% worse at every budget
    truth = math.exp(-offset / alpha)
    results = [compute_multiplier(budgets, *frontier(rng, budgets, alpha, offset, 0.01), draws=2000,
                                  seed=int(rng.integers(1 << 30))).estimate for _ in range(800)]
    assert 0.92 <= covered(results, truth) <= 0.985
    # The ablation's published case: four budgets, the variant 4.4-8.8% worse at each.
    peri = compute_multiplier(budgets, [5.577, 4.812, 4.047, 3.835], [5.903, 5.022, 4.403, 4.030])
    assert peri.estimate.high < 1 and "paired by budget" in peri.estimate.method


def test_per_budget_multipliers_cover_at_every_budget():
    """Two seeds per arm and budget; each seed's noise has a part both arms share (its data order)
    and a part of each arm's own. The variant is 6% worse at every budget: each budget's interval
    covers the true multiplier at about the nominal rate."""
    rng = np.random.default_rng(11)
    budgets = np.array([4e11, 1e12, 2.5e12, 6e12])
    alpha, offset, shared, own = 0.14, 0.06, 0.01, 0.006
    truth = math.exp(-offset / alpha)
    hits = np.zeros(len(budgets))
    repeats = 600
    for _ in range(repeats):
        pairs = []
        for c in budgets:
            common = 1.5 - alpha * math.log(c / budgets[0]) + shared * rng.standard_normal(2)
            base = np.exp(common + own * rng.standard_normal(2))
            pairs.append((base, np.exp(common + offset + own * rng.standard_normal(2))))
        for j, e in enumerate(budget_multipliers(budgets, pairs, draws=1000, seed=int(rng.integers(1 << 30)))):
            hits[j] += e.low <= truth <= e.high
    assert np.all((0.91 <= hits / repeats) & (hits / repeats <= 0.99)), hits / repeats
    one_seed = budget_multipliers(budgets, [([2.0], [2.1])] * 3 + [([1.9], [2.0])])
    assert all(not e.has_interval and "no interval" in e.method for e in one_seed)


def test_percentile_counts_failed_replicates():
    values = np.r_[np.arange(100.0), [np.nan] * 10]
    assert percentile(values) == (-math.inf, math.inf)
    assert percentile(np.arange(100.0)) == pytest.approx((2.0, 97.0), abs=1.0)


def lr_table(rng, true_losses, seeds):
    rows = []
    for cell, losses in true_losses.items():
        for lr, loss in losses.items():
            for s in range(seeds):
                rows.append({"cell": cell, "peak_lr": lr, "seed": s, "loss": loss + 0.02 * rng.standard_normal()})
    return pd.DataFrame(rows)


def test_cross_fitted_lr_choice_has_no_winners_curse():
    """Five LRs with equal true loss: the in-sample minimum is biased low by about the expected
    minimum of five normals; the cross-fitted value is not."""
    rng = np.random.default_rng(8)
    flat = {"a": {lr: 3.0 for lr in (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)}}
    in_sample, cross = [], []
    for _ in range(400):
        frame = lr_table(rng, flat, 2)
        choice = choose_lr(frame, ["cell"])
        assert choice.method.startswith(CROSS_FIT) and len(choice.rows) == 2
        cross.append(choice.rows["loss"].mean())
        in_sample.append(frame.groupby("peak_lr")["loss"].mean().min())
    assert abs(np.mean(cross) - 3.0) < 0.003
    assert np.mean(in_sample) < 3.0 - 0.015


def test_lr_at_the_edge_of_its_grid_is_named():
    rng = np.random.default_rng(9)
    frame = lr_table(rng, {"inside": {1e-3: 3.2, 2e-3: 3.0, 4e-3: 3.3}, "top": {1e-3: 3.4, 2e-3: 3.2, 4e-3: 3.0}}, 1)
    choice = choose_lr(frame, ["cell"])
    assert choice.method.startswith(IN_SAMPLE)
    assert choice.cells.set_index("cell")["edge"].to_dict() == {"inside": "", "top": "highest"}
    assert choice.edges() == ["LR at the edge of its grid [0.001, 0.002, 0.004] in 1 of 2 cells (top: 0.004 (highest))"]
    assert choice.edges({"cell": "inside"}) == []


def test_parametric_bootstrap_of_a_parabolas_vertex_covers():
    """The V_opt case: a parabola through seven design points fixed as run, its vertex's interval
    from new responses drawn around the fit (the design never resampled)."""
    from testbed.stats.curves import parametric_bootstrap

    rng = np.random.default_rng(10)
    x = np.log([512, 768, 1024, 2048, 4096, 6144, 8192])
    vertex, results = math.log(2000.0), []
    for _ in range(400):
        y = 1.2 + 0.02 * (x - vertex) ** 2 + 0.004 * rng.standard_normal(len(x))
        coef = np.polyfit(x, y, 2)
        fitted, sd = np.polyval(coef, x), math.sqrt(np.sum((y - np.polyval(coef, x)) ** 2) / (len(x) - 3))

        def refit(draw):
            a, b, _ = np.polyfit(x, draw, 2)
            return -b / (2 * a) if a > 0 else None

        values = np.array([np.nan if v is None else v for v in parametric_bootstrap(
            refit, fitted, sd, len(x) - 3, draws=300, seed=int(rng.integers(1 << 30)))])
        low, high = percentile(values)
        results.append(type("E", (), {"low": low, "high": high}))
    assert 0.92 <= covered(results, vertex) <= 0.98
