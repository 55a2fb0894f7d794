"""Published constants: data-constrained law, vocabulary law, Step Law."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from testbed.fit.estimation.estimate import fit, huber
from testbed.fit.laws import law_inputs, steplaw
from testbed.fit.laws.datacon import published_loss
from testbed.fit.laws.vocab import PUBLISHED, VOCAB

DATA = Path(__file__).parent / "data"


def test_data_constrained_check_values():
    # Muennighoff et al. 2023: U_D = 25e9 unique tokens.
    assert round(float(published_loss(6.34e9, 242e9, 25e9)[0]), 5) == 2.22564
    assert round(float(published_loss(8.67e9, 178e9, 25e9)[0]), 5) == 2.22696


def test_data_constrained_without_repetition_is_chinchilla_form():
    n, d = 1e9, 20e9
    a, b, e, alpha, beta = 6.255414, 7.3049974, 0.6254804, 0.3526596, 0.3526596
    expected = np.exp(e) + np.exp(a) / n**alpha + np.exp(b) / d**beta
    # U_D = D (one epoch) and N below the compute-optimal size for U_D: no discount applies.
    assert float(published_loss(n, d, d)[0]) == pytest.approx(expected, rel=1e-12)


def test_vocab_law_reproduces_tao_constants():
    raw = pd.read_csv(DATA / "tao_vocab" / "exp_data.csv")
    raw = raw[raw["FLOPs"] >= 2.18e17]
    assert len(raw) == 1054
    frame = pd.DataFrame({"Nnv": raw["Non_vocab_parameters"], "V": raw["vocab_size"], "d": raw["embed_dim"],
                          "H": raw["num_characters"], "loss": raw["Lossu"]})
    x, y = law_inputs(VOCAB, frame), frame["loss"].to_numpy()
    result = fit(VOCAB, x, y)
    for name in ("A1", "B", "E", "beta", "alpha2"):
        assert result.params[name] == pytest.approx(PUBLISHED[name], rel=0.02), name
    # A2 is weakly identified (it trades off against alpha2 along a flat valley): our optimum
    # sits 2.6% below the published value, and its Huber objective is lower than theirs.
    assert result.params["A2"] == pytest.approx(PUBLISHED["A2"], rel=0.03)
    theirs = np.array([[np.log(PUBLISHED["A1"]), np.log(PUBLISHED["A2"]), np.log(PUBLISHED["B"]),
                        PUBLISHED["E"], PUBLISHED["beta"], PUBLISHED["alpha2"]]])
    assert result.objective <= huber(y - VOCAB.predict(theirs, x)[0], 1e-3).sum()


def test_steplaw_rules_match_the_published_bootstrap_median():
    boot = pd.read_csv(DATA / "steplaw" / "1004_fitted_lr_bs_scaling_model_parameters.csv")
    median = boot.median()
    assert np.exp(median["lr_intercept"]) == pytest.approx(steplaw.LR_COEF, rel=0.01)
    assert median["lr_coefN"] == pytest.approx(steplaw.LR_N_EXP, abs=0.002)
    assert median["lr_coefD"] == pytest.approx(steplaw.LR_D_EXP, abs=0.002)
    assert np.exp(median["bs_intercept"]) == pytest.approx(steplaw.BS_COEF, rel=0.02)
    assert median["bs_coefD"] == pytest.approx(steplaw.BS_D_EXP, abs=0.002)
    assert steplaw.optimal_lr(1e9, 1e11) == pytest.approx(1.79 * 1e9**-0.713 * 1e11**0.307)
    assert steplaw.optimal_batch_tokens(1e11) == pytest.approx(0.58 * 1e11**0.571)


def test_steplaw_refit_recovers_rules_from_a_grid():
    rng = np.random.default_rng(0)
    rows = []
    for n in (1e8, 3e8, 1e9):
        for d in (1e10, 3e10, 1e11):
            lr_best, bs_best = steplaw.optimal_lr(n, d), steplaw.optimal_batch_tokens(d) / 2048
            for lr in lr_best * np.exp(np.linspace(-1, 1, 9)):
                for bs in bs_best * np.exp(np.linspace(-1, 1, 9)):
                    loss = 2 + 0.05 * np.log(lr / lr_best) ** 2 + 0.03 * np.log(bs / bs_best) ** 2
                    rows.append({"N": n, "D": d, "lr": lr, "bs": bs, "smooth loss": loss + 1e-6 * rng.random()})
    found = steplaw.refit(pd.DataFrame(rows))
    assert found["lr_N_exp"] == pytest.approx(-0.713, abs=1e-3)
    assert found["lr_D_exp"] == pytest.approx(0.307, abs=1e-3)
    assert found["bs_D_exp"] == pytest.approx(0.571, abs=1e-3)
    assert found["lr_coef"] == pytest.approx(1.79, rel=0.01)


def test_steplaw_rejects_non_positive_sizes():
    from testbed.errors import TestbedError

    with pytest.raises(TestbedError, match="N=0"):
        steplaw.optimal_lr(0, 1e9)
