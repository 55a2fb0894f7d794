"""Task laws (testbed/fit/tasks.py, testbed/fit/laws/task.py) on simulated model ladders with a
known answer: both steps recover their constants, the chained interval covers the true accuracy
about as often as it claims, too few points are one clear error, and the CLI prints the fit."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from testbed.cli import main
from testbed.errors import TestbedError
from testbed.fit.laws.task import sigmoid
from testbed.fit.tasks import fit_task, parameters, predict

STEP1 = {"E": 0.5, "A": 60.0, "alpha": 0.30, "B": 200.0, "beta": 0.30}  # task bpb against (N, D)
STEP2 = {"a": 0.6, "k": -6.0, "L0": 1.0, "b": 0.25}  # accuracy against task bpb; chance 0.25
SIZES = (2e7, 6e7, 1.5e8, 4e8, 1e9)
MULTIPLIERS = (1, 2, 5, 10)  # tokens: 20 N times these (the OLMo ladder's 1x-10x Chinchilla)


def task_loss(N, D):
    return STEP1["E"] + STEP1["A"] / N ** STEP1["alpha"] + STEP1["B"] / D ** STEP1["beta"]


def accuracy(loss):
    return sigmoid(np.array(list(STEP2.values())), np.atleast_1d(np.asarray(loss, float)))


def ladder(rng, sizes=SIZES, sd_loss=0.01, sd_acc=0.01) -> pd.DataFrame:
    """One run per (N, D): the run's task loss off the law by its seed's noise, its accuracy the
    sigmoid of that loss plus the evaluation's noise."""
    rows = []
    for n in sizes:
        for m in MULTIPLIERS:
            d = 20 * m * n
            loss = task_loss(n, d) * np.exp(sd_loss * rng.standard_normal())
            acc = accuracy(loss)[0] + sd_acc * rng.standard_normal()
            rows.append({"run_id": f"{n:.0e}x{m}", "N": n, "D": d, "C": 6 * n * d, "loss": loss, "acc": acc})
    return pd.DataFrame(rows)


def test_both_steps_recover_their_constants():
    frame = ladder(np.random.default_rng(3), sizes=(2e7, 4e7, 8e7, 1.6e8, 3.2e8, 6.4e8, 1.28e9),
                   sd_loss=0.003, sd_acc=0.005)
    fitted = fit_task(frame, delta=1.0)  # b fitted, not fixed
    one, two = fitted.step1.params, fitted.step2.params
    assert one["E"] == pytest.approx(STEP1["E"], abs=0.03)
    assert one["alpha"] == pytest.approx(STEP1["alpha"], abs=0.05)
    assert one["beta"] == pytest.approx(STEP1["beta"], abs=0.05)
    assert np.log(one["B"]) == pytest.approx(np.log(STEP1["B"]), abs=0.5)
    assert two["a"] == pytest.approx(STEP2["a"], abs=0.05)
    assert two["k"] == pytest.approx(STEP2["k"], rel=0.15)
    assert two["L0"] == pytest.approx(STEP2["L0"], abs=0.03)
    assert two["b"] == pytest.approx(STEP2["b"], abs=0.04)
    # with the chance level known, b is not fitted and the rest still recovers
    fixed = fit_task(frame, chance=0.25, delta=1.0).step2.params
    assert fixed["b"] == 0.25 and fixed["a"] == pytest.approx(STEP2["a"], abs=0.03)


def test_chained_interval_covers_the_true_accuracy_about_as_often_as_it_claims():
    """120 simulated ladders; at a target beyond the largest run (2x its N) the 95% interval of
    the chained accuracy must hold the true value 88-99% of the time."""
    start = np.array([[np.log(STEP1["A"]), np.log(STEP1["B"]), np.log(STEP1["E"]), STEP1["alpha"], STEP1["beta"]]])
    target = {"N": 2e9, "D": 4e10}
    truth = accuracy(task_loss(**target))[0]
    repeats, hits, hits_loss = 120, 0, 0
    for r in range(repeats):
        frame = ladder(np.random.default_rng(100 + r))
        fitted = fit_task(frame, chance=0.25, delta=1.0, bootstrap=100, seed=r, starts=start)
        row = predict(fitted, [target])[0]
        hits += row["accuracy_low"] <= truth <= row["accuracy_high"]
        hits_loss += row["task_loss_low"] <= task_loss(**target) <= row["task_loss_high"]
    assert 0.88 <= hits / repeats <= 0.99, hits / repeats
    assert 0.85 <= hits_loss / repeats <= 0.99, hits_loss / repeats


def test_parameters_carry_intervals_and_far_targets_say_how_far():
    fitted = fit_task(ladder(np.random.default_rng(0)), chance=0.25, delta=1.0, bootstrap=50)
    table = parameters(fitted)
    assert table["step 1"]["alpha"]["low"] < table["step 1"]["alpha"]["estimate"] < table["step 1"]["alpha"]["high"]
    assert "low" not in table["step 2"]["b"]  # fixed to the chance level
    near, far = predict(fitted, [{"N": 4e8, "D": 8e9}, {"N": 1e11, "D": 2e12}])
    assert near["extrapolation"] == []
    assert any("100.0x the largest fitted N" in line for line in far["extrapolation"])
    assert any("below the lowest fitted" in line for line in far["extrapolation"])


def test_too_few_points_is_one_clear_error():
    frame = ladder(np.random.default_rng(0)).iloc[:5]
    with pytest.raises(TestbedError, match=r"at least 6 points .* but 5 remain"):
        fit_task(frame)


def test_cli_fits_a_table(tmp_path, capsys):
    frame = ladder(np.random.default_rng(1))
    table = frame.rename(columns={"loss": "task/hella/bpb", "acc": "task/hella/acc"}).drop(columns="C")
    table.to_csv(tmp_path / "ladder.csv", index=False)
    out = tmp_path / "out"
    assert main(["fit", str(tmp_path / "ladder.csv"), "--law", "task", "--task", "hella", "--chance", "0.25",
                 "--predict", "N=3e9,D=6e10", "--bootstrap", "40", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Acc(L) = a / (1 + exp(-k (L - L0))) + b" in printed and "| step 1 | alpha |" in printed
    assert "| 3e+09 | 6e+10 |" in printed
    saved = json.loads((out / "fit.json").read_text())
    row = saved["predictions"][0]
    assert row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"]
    assert abs(row["accuracy"] - accuracy(task_loss(3e9, 6e10))[0]) < 0.05
    assert main(["fit", str(tmp_path / "ladder.csv"), "--law", "task", "--task", "arc", "--out", str(out)]) == 2
    assert "tasks in it: hella" in capsys.readouterr().err


def test_options_the_task_law_does_not_apply_are_refused(tmp_path, capsys):
    from testbed.cli import main

    table = tmp_path / "t.csv"
    table.write_text("N,D,task/x/bpb,task/x/acc\n1e6,1e8,1.0,0.5\n")
    assert main(["fit", str(table), "--law", "task", "--task", "x", "--holdout", "largest"]) == 2
    err = capsys.readouterr().err
    assert "--law task does not take --holdout" in err and "Traceback" not in err
