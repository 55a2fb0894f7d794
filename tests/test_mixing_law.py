"""The data mixing law (Ye et al. 2024) on simulated mixtures with known c, k and t: recovery,
held-out mixtures, the coverage of its covariance intervals, its errors and the command."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from testbed.cli import main
from testbed.errors import TestbedError
from testbed.fit.laws import mixing


def reduced(k: float, t: np.ndarray) -> tuple[float, np.ndarray]:
    """The law's identified form with t of the last component fixed to 0: k e^{t_K}, t_j - t_K."""
    return k * float(np.exp(t[-1])), np.asarray(t[:-1]) - t[-1]


def simulate(rng, names, c, k, t, weights, noise, n_d=(1e8, 2e9)):
    """A table as `testbed fit collect` writes it for a mixture sweep: weight/<name>,
    source/<name>/val_loss (multiplicative log-normal noise), the mixture's val_loss, N, D."""
    frame = pd.DataFrame({f"weight/{name}": weights[:, j] for j, name in enumerate(names)})
    total = np.zeros(len(weights))
    for i, name in enumerate(names):
        loss = (c[i] + k[i] * np.exp(weights @ np.asarray(t[i]))) * np.exp(noise * rng.standard_normal(len(weights)))
        frame[f"source/{name}/val_loss"] = loss
        total += weights[:, i] * loss
    frame["val_loss"] = total
    frame["N"], frame["D"] = n_d
    frame["run_id"] = [f"mix{i}" for i in range(len(weights))]
    return frame


def two_weights(n, low=0.05, high=0.95):
    a = np.linspace(low, high, n)
    return np.column_stack([a, 1 - a])


TWO = dict(names=["web", "code"], c=[2.0, 1.0], k=[1.5, 1.2], t=[[-2.0, 0.0], [1.0, -1.5]])
THREE = dict(names=["web", "code", "books"], c=[2.0, 1.0, 2.5], k=[1.5, 1.2, 1.0],
             t=[[-2.0, 0.5, 0.0], [0.5, -3.0, 0.0], [0.3, 0.4, -1.5]])


def check_recovered(fit, truth, c_tol, k_rel, t_tol):
    names = truth["names"]
    for i, name in enumerate(names):
        params = fit.fits[f"source/{name}/val_loss"].params
        k_true, t_true = reduced(truth["k"][i], np.asarray(truth["t"][i]))
        assert abs(params["c"] - truth["c"][i]) < c_tol, (name, params)
        assert abs(params["k"] / k_true - 1) < k_rel, (name, params, k_true)
        for j, other in enumerate(names[:-1]):
            assert abs(params[f"t_{other}"] - t_true[j]) < t_tol, (name, other, params, t_true)
        assert params[f"t_{names[-1]}"] == 0.0


def test_two_sources_recovered_and_held_out_mixtures_predicted():
    rng = np.random.default_rng(1)
    frame = simulate(rng, weights=two_weights(12), noise=0.002, **TWO)
    table = mixing.load_mixtures(frame)
    assert table.components == ["web", "code"] and table.overall == "val_loss"
    fit = mixing.fit_mixing(table)
    check_recovered(fit, TWO, c_tol=0.05, k_rel=0.05, t_tol=0.1)
    rows = mixing.holdout(table)
    assert len(rows) == 12
    errors = [abs(v["rel_error"]) for r in rows for v in r["losses"].values()]
    # 0.2% noise: the held-out mixtures are predicted within 0.5% on average, each within 1.5%
    assert np.mean(errors) < 0.005 and max(errors) < 0.015
    assert all("val_loss" in r["losses"] for r in rows)  # the mixture's own loss, sum r_i L_i


def test_three_sources_recovered():
    rng = np.random.default_rng(2)
    weights = rng.dirichlet(np.ones(3), size=20)
    frame = simulate(rng, weights=weights, noise=0.002, **THREE)
    table = mixing.load_mixtures(frame)
    fit = mixing.fit_mixing(table)
    check_recovered(fit, THREE, c_tol=0.1, k_rel=0.25, t_tol=0.3)
    # the uniform-target optimum of this law lies inside the sampled simplex
    optimum = mixing.optimal_mixture(fit)
    assert optimum["at_edge"] == [] and "inside" in optimum["status"]
    assert abs(sum(optimum["weights"].values()) - 1) < 1e-6
    rows = mixing.holdout(table, "weight/web>0.5")
    assert rows and all(r["weights"]["web"] > 0.5 for r in rows)
    assert np.mean([abs(v["rel_error"]) for r in rows for v in r["losses"].values()]) < 0.01


def test_optimum_at_the_edge_of_the_sampled_region_is_labelled():
    rng = np.random.default_rng(3)
    frame = simulate(rng, weights=two_weights(10, 0.1, 0.6), noise=0.002, **TWO)
    fit = mixing.fit_mixing(mixing.load_mixtures(frame, target="source/web/val_loss"))
    optimum = mixing.optimal_mixture(fit, {"source/web/val_loss": 1.0})
    # web's own loss falls as its weight rises: the best mixture within 0.1-0.6 is at 0.6
    assert abs(optimum["weights"]["web"] - 0.6) < 1e-3
    assert optimum["at_edge"] and "not a result" in optimum["status"]
    assert optimum["simplex_optimum"]["web"] > 0.99 and optimum["simplex_beyond_sampled"] > 0.3


def test_interval_coverage_on_simulated_mixtures():
    """150 simulated 10-mixture tables: the 95% intervals of the law's value at an unseen mixture
    (web 0.33, between design points), of a new run's loss there, and of t_web, hold the truth
    about 95% of the time."""
    rng = np.random.default_rng(4)
    weights = two_weights(10)
    at = np.array([[0.33, 0.67]])
    c, k, t = 2.0, 1.5, np.array([-2.0, 0.0])
    truth = c + k * np.exp(at @ t)[0]
    inside = {"law": 0, "new_run": 0, "mean_of_two": 0, "t_web": 0}
    repeats, noise = 150, 0.005
    for _ in range(repeats):
        loss = (c + k * np.exp(weights @ t)) * np.exp(noise * rng.standard_normal(len(weights)))
        fit = mixing.fit_source(weights, loss, ["web", "code"])
        _, low, high = fit.interval(at)
        inside["law"] += int(low[0] <= truth <= high[0])
        new = truth * np.exp(noise * rng.standard_normal())
        _, low, high = fit.interval(at, new_run=True)
        inside["new_run"] += int(low[0] <= new <= high[0])
        mean = truth * np.exp(noise * rng.standard_normal(2).mean())  # two seeds' geometric mean
        _, low, high = fit.interval(at, new_run=True, runs=2)
        inside["mean_of_two"] += int(low[0] <= mean <= high[0])
        lo, hi = fit.param_intervals()["t_web"]
        inside["t_web"] += int(lo <= t[0] <= hi)
    coverage = {name: count / repeats for name, count in inside.items()}
    # 95% nominal; 150 repeats: binomial SE 1.8%, so 0.89-0.995 allows about 3 SE below
    for name, value in coverage.items():
        assert 0.89 <= value <= 0.995, coverage


def test_too_few_mixtures_is_one_error_naming_both_counts():
    rng = np.random.default_rng(5)
    frame = simulate(rng, weights=rng.dirichlet(np.ones(3), size=4), noise=0.002, **THREE)
    with pytest.raises(TestbedError, match=r"at least 5 mixtures, but 4 remain"):
        mixing.fit_mixing(mixing.load_mixtures(frame))
    with pytest.raises(TestbedError, match=r"at least 5 fitted mixtures after the holdout, but 4 remain"):
        mixing.holdout(mixing.load_mixtures(simulate(rng, weights=rng.dirichlet(np.ones(3), size=5),
                                                     noise=0.002, **THREE)))


def test_weights_not_summing_to_one_and_several_sizes_are_refused():
    rng = np.random.default_rng(6)
    frame = simulate(rng, weights=two_weights(8), noise=0.002, **TWO)
    bad = frame.copy()
    bad.loc[2, "weight/web"] += 0.1
    with pytest.raises(TestbedError, match=r"weights of 1 mixture\(s\) do not sum to 1 \(e.g. mix2: 1.1"):
        mixing.load_mixtures(bad)
    sizes = frame.copy()
    sizes.loc[:3, "N"] = 2e8
    with pytest.raises(TestbedError, match=r"2 values of N"):
        mixing.load_mixtures(sizes)
    assert len(mixing.load_mixtures(sizes, where=["N==1e8"]).frame) == 4
    with pytest.raises(TestbedError, match=r"--target 'source/x/val_loss' is not a column"):
        mixing.load_mixtures(frame, target="source/x/val_loss")


def test_command_prints_the_fit_and_the_holdout_errors(tmp_path, capsys):
    rng = np.random.default_rng(7)
    table = tmp_path / "mix.csv"
    simulate(rng, weights=rng.dirichlet(np.ones(3), size=12), noise=0.003, **THREE).to_csv(table, index=False)
    out = tmp_path / "out"
    assert main(["fit", str(table), "--law", "mixing", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "L_i(r) = c_i + k_i * exp(sum_j t_ij r_j)" in printed
    assert "source/web/val_loss: c " in printed and "t_books 0 (fixed)" in printed
    assert "held-out mixtures (leave one mixture out): mean absolute relative error" in printed
    assert "mix11 (web" in printed and "optimal mixture" in printed
    saved = json.loads((out / "fit.json").read_text())
    assert saved["reference"] == "books" and len(saved["holdout"]) == 12
    assert main(["fit", str(table), "--law", "mixing", "--target", "source/code/val_loss",
                 "--holdout", "weight/code>0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "source/web/val_loss" not in printed and "--holdout weight/code>0.5" in printed
    assert main(["fit", str(table), "--law", "mixing", "--variant", "regmix", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "regmix regression (Liu et al. 2024)" in printed and "held-out mixtures" in printed
    assert main(["fit", str(table), "--law", "mixing", "--bootstrap", "10", "--out", str(out)]) != 0
    assert "--law mixing does not take --bootstrap" in capsys.readouterr().err


def test_regmix_regression_predicts_held_out_mixtures():
    rng = np.random.default_rng(8)
    frame = simulate(rng, weights=rng.dirichlet(np.ones(3), size=20), noise=0.002, **THREE)
    table = mixing.load_mixtures(frame)
    fit = mixing.fit_mixing(table, "regmix")
    assert set(fit.fits["source/web/val_loss"].params) == {"b_web", "b_code", "b_books", "b_web*code",
                                                           "b_web*books", "b_code*books"}
    rows = mixing.holdout(table, variant="regmix")
    errors = [abs(v["rel_error"]) for r in rows for v in r["losses"].values()]
    # a quadratic in log-loss only approximates the exponential law: within 1.5% on average here
    assert np.mean(errors) < 0.015
    with pytest.raises(TestbedError, match=r"regmix regression with 3 components has 6 parameters .* at least 7 mixtures, but 6"):
        mixing.fit_mixing(mixing.load_mixtures(frame.iloc[:6]), "regmix")
    with pytest.raises(TestbedError, match=r"--variant 'tied' is unknown for --law mixing"):
        mixing.fit_mixing(table, "tied")
