"""The Multi-Power Law: its grouped sum matches the exact one, and a fit on constant and cosine
curves recovers the law and predicts a WSD curve."""

import json

import numpy as np
import pandas as pd
import pytest

from testbed.cli import main
from testbed.fit.estimation.estimate import fit
from testbed.fit.laws import law_inputs
from testbed.fit.laws.multipower import MULTIPOWER, curve_inputs, predict_curve

# L0=2, A=0.6, alpha=0.5, B=400, C=2, beta=0.6, gamma=0.6 (the size of the paper's fits)
TRUE = np.array([np.log(2.0), np.log(0.6), 0.5, np.log(400.0), np.log(2.0), 0.6, 0.6])
STEPS, PEAK, WARMUP, EVERY = 3200, 3e-4, 160, 80


def schedules():
    s = np.arange(1, STEPS + 1)
    warm = np.minimum(1.0, s / WARMUP)
    progress = np.clip((s - WARMUP) / (STEPS - WARMUP), 0, 1)
    decay_start = 0.8 * STEPS
    return s, {
        "constant": PEAK * warm,
        "cosine": PEAK * warm * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress))),
        "wsd": PEAK * warm * np.where(s < decay_start, 1.0, 1 - 0.9 * (s - decay_start) / (STEPS - decay_start)),
        "step": PEAK * warm * np.where(s <= STEPS // 2, 1.0, np.where(s <= 3 * STEPS // 4, 0.3, 0.1)),
    }


def simulate(noise, seed=0):
    """Curves logged every EVERY steps (and at step 1, so the warmup ramp is known)."""
    rng = np.random.default_rng(seed)
    s, lrs = schedules()
    logged = s[(s % EVERY == 0) | (s == 1)]
    rows = []
    for name, lr in lrs.items():
        clean = predict_curve(TRUE, s, lr, at_steps=logged, groups=None)
        loss = clean * np.exp(noise * rng.standard_normal(len(logged)))
        rows.append(pd.DataFrame({"run_id": name, "step": logged, "lr": lr[logged - 1], "loss": loss, "clean": clean}))
    return pd.concat(rows, ignore_index=True)


def direct_loss(lr, t, l0=2.0, a=0.6, alpha=0.5, b=400.0, c=2.0, beta=0.6, gamma=0.6):
    """The paper's equation written out step by step (1-based t, eta_0 = the peak at warmup's end)."""
    w = int(np.argmax(lr)) + 1  # last warmup step (1-based)
    if t <= w:
        return l0 + a * lr[:t].sum() ** -alpha
    eta = lr[w - 1 :]  # eta_0 .. eta_(T-w)
    tau = t - w
    s_w, s1 = lr[:w].sum(), eta[1 : tau + 1].sum()
    drop = 0.0
    for k in range(1, tau + 1):
        s_k = eta[k : tau + 1].sum()
        drop += (eta[k - 1] - eta[k]) * (1 - (c * eta[k] ** -gamma * s_k + 1) ** -beta)
    return l0 + a * (s1 + s_w) ** -alpha - b * drop


def test_law_matches_the_equation_and_the_grouping_is_exact_enough():
    s, lrs = schedules()
    at = np.array([1, 100, 800, 1600, 1700, 2500, 2600, 3200])
    for name, lr in lrs.items():
        exact = predict_curve(TRUE, s, lr, at_steps=at, groups=None)
        direct = np.array([direct_loss(lr, t) for t in at])
        assert exact == pytest.approx(direct, rel=1e-10), name
        grouped = predict_curve(TRUE, s, lr, at_steps=at)
        assert np.max(np.abs(grouped / exact - 1)) < 1e-4, name
    # A constant schedule has no loss drop: the law is a power law in the LR area.
    constant = predict_curve(TRUE, s, lrs["constant"], at_steps=at)
    area = np.cumsum(lrs["constant"])[at - 1]
    assert constant == pytest.approx(2.0 + 0.6 * area**-0.5, rel=1e-12)
    # Each decay lowers the loss below the constant run at the same step.
    assert (predict_curve(TRUE, s, lrs["wsd"], at_steps=[3200]) < constant[-1] - 0.03).all()
    x = curve_inputs(s, lrs["step"], [3200])
    assert x["drop"].sum() == pytest.approx(0.9 * PEAK)  # the total LR decrease after warmup


def test_fit_on_constant_and_cosine_predicts_wsd():
    noise = 0.0005
    data = simulate(noise)
    train = data[data.run_id.isin(["constant", "cosine"])]
    result = fit(MULTIPOWER, law_inputs(MULTIPOWER, train), train["loss"].to_numpy())
    params = result.params
    assert params["L0"] == pytest.approx(2.0, rel=0.01)
    assert params["A"] == pytest.approx(0.6, rel=0.02)
    assert params["alpha"] == pytest.approx(0.5, abs=0.01)
    # B sets the size of the loss drop, which the cosine curve pins down; C, beta and gamma
    # shape how it builds up and are only loosely determined by two schedules.
    assert params["B"] == pytest.approx(400.0, rel=0.15)
    wsd = data[data.run_id == "wsd"]
    rel = np.abs(result.predict(law_inputs(MULTIPOWER, wsd)) / wsd["clean"].to_numpy() - 1)
    assert rel.mean() < noise / 2
    tail = wsd["step"].to_numpy() > 0.8 * STEPS  # the cooldown, where the loss-drop term acts
    assert rel[tail].max() < 4 * noise
    # The cooldown's drop is large next to the error: a law without LD could not follow it.
    assert wsd["clean"].iloc[-1] < wsd["clean"][wsd["step"] == 2560].iloc[0] - 0.05


def test_cli_fits_two_schedules_and_scores_the_held_out_one(tmp_path, capsys):
    data = simulate(0.0)
    # Sparse logging (every 160 steps) keeps the prediction intervals' refits quick.
    data = data[data.run_id.isin(["constant", "cosine", "wsd"]) & ((data.step % 160 == 0) | (data.step == 1))]
    table = tmp_path / "curves.csv"
    data.drop(columns="clean").to_csv(table, index=False)
    out = tmp_path / "fit"
    assert main(["fit", str(table), "--law", "multipower", "--points", "all", "--skip-fraction", "0",
                 "--holdout", "run_id=='wsd'", "--no-plots", "--out", str(out)]) == 0
    saved = json.loads((out / "fit.json").read_text())
    assert saved["law"] == "multipower"
    # The learning rate between logged rows is interpolated, so the fit is close, not exact.
    assert saved["mean_abs_rel_error"] < 3e-3
    assert {row["run_id"] for row in saved["holdout"]} == {"wsd"}
    assert saved["params"]["L0"] == pytest.approx(2.0, rel=0.02)


def test_dropped_early_checkpoints_keep_their_learning_rates_in_the_schedule():
    from testbed.fit.analysis import FitOptions, analyse

    data = simulate(0.0)
    data = data[(data.step % 160 == 0) | (data.step == 1)].drop(columns="clean")
    # --skip-fraction 0.1 and --where drop the warmup's rows from the fit, not from the schedule.
    analysis = analyse(data, FitOptions(law="multipower", points="all", where="step>=480", allocation="no"))
    frame = analysis.frame
    assert frame["step"].min() == 480
    x = law_inputs(MULTIPOWER, frame)
    for run, part in frame.groupby("run_id"):
        rows = np.flatnonzero(frame["run_id"].to_numpy() == run)
        logged = data[data.run_id == run]  # the run's whole logged schedule, from step 1
        full = curve_inputs(logged["step"], logged["lr"], part["step"].to_numpy(int))
        assert x["area"][rows] == pytest.approx(full["area"], rel=1e-12)
    # Without the attached schedule the warmup would be lost: the first kept row would start the areas.
    bare = law_inputs(MULTIPOWER, frame.drop(columns="schedule"))
    assert not np.allclose(bare["area"], x["area"])
    assert analysis.result.params["L0"] == pytest.approx(2.0, rel=5e-3)


def test_step_and_wsd_curves_identify_every_parameter_and_predict_cosine():
    # Two decay shapes whose LR history the logged rows give exactly: a WSD decay is linear, and
    # the step schedule is logged on both sides of each drop. Their drops, at different LRs and
    # times, pin down all seven parameters, including C, beta and gamma of the loss-drop term.
    s, lrs = schedules()
    logged = s[(s % EVERY == 0) | np.isin(s, [1, STEPS // 2 + 1, 3 * STEPS // 4 + 1])]
    rows = [pd.DataFrame({"run_id": name, "step": logged, "lr": lrs[name][logged - 1],
                          "loss": predict_curve(TRUE, s, lrs[name], at_steps=logged, groups=None)})
            for name in ("step", "wsd")]
    train = pd.concat(rows, ignore_index=True)
    result = fit(MULTIPOWER, law_inputs(MULTIPOWER, train), train["loss"].to_numpy())
    expected = {"L0": 2.0, "A": 0.6, "alpha": 0.5, "B": 400.0, "C": 2.0, "beta": 0.6, "gamma": 0.6}
    for name, value in expected.items():
        assert result.params[name] == pytest.approx(value, rel=0.05 if name == "C" else 0.01), name
    # The cosine curve, never seen, from its per-step schedule.
    predicted = predict_curve(result.theta, s, lrs["cosine"], at_steps=logged)
    exact = predict_curve(TRUE, s, lrs["cosine"], at_steps=logged, groups=None)
    assert np.max(np.abs(predicted / exact - 1)) < 2e-4


def test_rows_with_zero_or_negative_learning_rates_are_refused_with_a_count(tmp_path, capsys):
    # A learning rate of 0 (or below) has no log and no LR area: the law's eta^(-gamma) term blows up,
    # and the fit used to report converged nonsense. The rows are counted and refused, never dropped
    # (dropping them would change the run's LR area).
    data = simulate(0.0)
    data = data[data.run_id.isin(["constant", "cosine"]) & ((data.step % 320 == 0) | (data.step == 1))]
    data = data.drop(columns="clean").reset_index(drop=True)
    bad = data.index[data.run_id == "cosine"][-3:]
    data.loc[bad, "lr"] = [0.0, -1e-4, 0.0]
    table = tmp_path / "curves.csv"
    data.to_csv(table, index=False)
    out = tmp_path / "fit"
    assert main(["fit", str(table), "--law", "multipower", "--points", "all", "--skip-fraction", "0",
                 "--no-plots", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert "3 rows have lr <= 0" in err and "cosine" in err, err
    assert not out.exists()
    # The same rows on a run that --where leaves out are no obstacle.
    assert main(["fit", str(table), "--law", "multipower", "--points", "all", "--skip-fraction", "0",
                 "--where", "run_id=='constant'", "--no-plots", "--out", str(out)]) == 0, capsys.readouterr().err
