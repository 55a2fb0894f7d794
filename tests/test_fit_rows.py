"""Row selection: the --where language, per-run fractions (the checkpoint-extrapolation
protocol) and outside tables with a run column."""

import numpy as np
import pandas as pd
import pytest

from testbed.errors import TestbedError
from testbed.fit.analysis import FitOptions, analyse
from testbed.fit.points.rules import rule_mask

FRAME = pd.DataFrame({"N": [1e7, 1e8, 1e9, 1e9], "label_norm": ["pre", "post", "pre", "peri"],
                      "label_lr": [1e-3, 3e-3, 1e-3, 1e-2]})


@pytest.mark.parametrize("rule, rows", [
    ("N>1e7", [1, 2, 3]),
    ("label_norm=='pre' and N>=1e8", [2]),
    ('label_norm == "post" or N < 1e8', [0, 1]),
    ("label_norm in ['pre', 'peri']", [0, 2, 3]),
    ("label_lr in [1e-3, 1e-2] and not (N==1e7)", [2, 3]),
    ("label_norm not in [pre]", [1, 3]),
    ("label_norm!=pre", [1, 3]),
])
def test_rules(rule, rows):
    assert list(np.flatnonzero(rule_mask(FRAME, rule))) == rows


def test_bad_rules_name_the_fix():
    with pytest.raises(TestbedError, match="no row has label_norm == 'pree'; did you mean 'pre'"):
        rule_mask(FRAME, "label_norm=='pree'")
    with pytest.raises(TestbedError, match="names column 'label_nrom'.*did you mean 'label_norm'"):
        rule_mask(FRAME, "label_nrom=='pre'")
    with pytest.raises(TestbedError, match="--where 'N>1e7 and' is not understood: it ends too early"):
        rule_mask(FRAME, "N>1e7 and")


def table(n=14):
    n_params = np.logspace(6, 8, n)
    tokens = np.where(np.arange(n) % 2, 20, 40) * n_params
    loss = 1.8 + 400 / n_params**0.34 + 1500 / tokens**0.36
    return pd.DataFrame({"N": n_params, "D": tokens, "loss": loss, "label_norm": ["pre", "post"] * (n // 2)})


def test_several_where_combine_with_and():
    analysis = analyse(table(), FitOptions(where=["N>=2e6", "label_norm=='pre'"], allocation="no"))
    kept = analysis.frame
    assert (kept["label_norm"] == "pre").all() and (kept["N"] >= 2e6).all()
    assert analysis.summary.dropped == {"not matching --where N>=2e6 and label_norm=='pre'": 14 - len(kept)}


LAW = {"A": 400.0, "B": 1500.0, "E": 1.8, "alpha": 0.34, "beta": 0.28}


def curves(sizes=(1e7, 2e7, 5e7, 1e8, 2e8, 5e8), points=20, noise=0.0005, seed=0):
    """Loss curves along which the law holds at every checkpoint (a constant-LR family), one
    run per model (named in a `model` column), each trained to 20 tokens per parameter."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        for d in 20 * n * np.linspace(1 / points, 1, points):
            loss = LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]
            rows.append({"model": f"m{n:.0e}", "params": n, "tokens": d, "loss": loss * np.exp(noise * rng.standard_normal())})
    return pd.DataFrame(rows)


def test_checkpoint_extrapolation_protocol():
    """Fit the smaller models' checkpoints up to 30% of their tokens (above a token floor), score
    the largest model's checkpoints past 70% of its run."""
    options = FitOptions(columns="N=params,D=tokens", points="all", skip_fraction=0.0, holdout="largest-N",
                         train_until=0.3, where="D>=5e7", score_after=0.7, allocation="no")
    analysis = analyse(curves(), options)
    frame, summary = analysis.frame, analysis.summary
    assert summary.run_column == "model"
    train, held = frame[~frame["held_out"]], frame[frame["held_out"]]
    assert (train["run_fraction"] <= 0.3 + 1e-9).all() and (train["D"] >= 5e7).all()
    assert set(held["run_id"]) == {"m5e+08"} and (held["run_fraction"] >= 0.7 - 1e-9).all()
    assert len(summary.holdout) == 7  # fractions 0.70, 0.75, ..., 1.0
    assert summary.dropped["training checkpoints past 30% of their run (--train-until)"] > 0
    assert summary.dropped["held-out checkpoints before 70% of their run (--score-after)"] > 0
    assert summary.mean_abs_rel_error < 0.005
    assert summary.params["alpha"] == pytest.approx(0.34, abs=0.05)


def test_fractions_need_a_position_and_a_holdout():
    with pytest.raises(TestbedError, match="--score-after selects held-out checkpoints; give --holdout"):
        analyse(curves(), FitOptions(columns="N=params,D=tokens", points="all", score_after=0.7))
    with pytest.raises(TestbedError, match=r"--train-until 1.5 is outside \(0, 1\]"):
        analyse(curves(), FitOptions(columns="N=params,D=tokens", points="all", train_until=1.5))


def test_outside_table_run_column_final_points_and_skip_fraction():
    frame = curves(points=10)
    final = analyse(frame, FitOptions(columns="N=params,D=tokens", allocation="no"))
    assert final.summary.n_points == 6 and final.summary.n_runs == 6
    assert final.summary.dropped == {"earlier checkpoints of each run (use --points all to include)": 54}
    assert (final.frame["run_fraction"] == 1.0).all()
    every = analyse(frame, FitOptions(columns="N=params,D=tokens", points="all", skip_fraction=0.25, allocation="no"))
    assert every.summary.n_points == 6 * 8  # fractions 0.1 and 0.2 dropped from each run
    assert every.summary.dropped == {"checkpoints in the first 25% of their run (--skip-fraction)": 12}
    # Without a run column every row is its own run: nothing to drop.
    alone = analyse(frame.drop(columns="model"), FitOptions(columns="N=params,D=tokens", allocation="no"))
    assert alone.summary.n_points == 60 and alone.summary.run_column is None
    named = analyse(frame.rename(columns={"model": "cfg"}), FitOptions(columns="N=params,D=tokens,run_id=cfg", allocation="no"))
    assert named.summary.n_runs == 6 and named.summary.run_column == "cfg"
