"""The discrepancy study's counting, fits, intervals and verdict on simulated IsoFLOP points (no training).

Each interval method is checked for coverage on simulated data with a known answer: the joint fit
of a re-counted grid (runs of one budget at different C), the paired difference of two countings
of the same losses, and the difference of two independent fits.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from testbed.study.base import Analysis, Measurement
from testbed.study.builtin import discrepancy as study

BUDGETS = np.log([1e11, 2e11, 4e11])
REPLICATES = 100  # a coverage of 0.95 reads within about ±0.045 (two SEs)


def by_hand_non_embedding(d: int, layers: int) -> int:
    """The built-in block written out here (q, k, v, o, SwiGLU's three matrices, two RMSNorms; one
    final norm), not taken from testbed.model.counting."""
    d_ff = 32 * -(-round(8 / 3 * d) // 32)
    return layers * (4 * d * d + 3 * d * d_ff + 2 * d) + d


def test_counting_adds_the_head_and_nothing_else():
    from testbed.config import ModelConfig
    from testbed.model.counting import count_params

    rows = []
    for d in (16, 32, 64):
        cfg = ModelConfig(d_model=d, n_layers=4, n_heads=2, max_seq_len=128, vocab_size=512)
        counts = count_params(cfg)  # the points table's N and N_non_embedding come from here
        head = 512 * d  # the untied output head: V x d, no bias
        assert counts.non_embedding == by_hand_non_embedding(d, 4)
        assert counts.total == counts.non_embedding + 2 * head  # input embedding and head
        rows.append({"N": counts.total, "N_non_embedding": counts.non_embedding, "vocab": 512, "width": d,
                     "D": 1e6, "C": 1.0, "head": head})
    frame = pd.DataFrame(rows)
    kaplan, counted = study.counted(frame, head=False), study.counted(frame, head=True)
    assert np.allclose(kaplan["N"], [by_hand_non_embedding(d, 4) for d in (16, 32, 64)])
    assert np.allclose(counted["N"], kaplan["N"] + frame["head"])
    assert np.allclose(counted["C"], 6 * counted["N"] * 1e6) and np.allclose(kaplan["C"], 6 * kaplan["N"] * 1e6)
    assert np.allclose(counted["N_total"], frame["N"])  # the testbed's own count kept beside


def test_the_sweeps_are_kaplans_recipe_and_the_corrected_one():
    for size in ("tiny", "cpu", "gpu"):
        kaplan, tuned = study.sweeps(size)
        assert kaplan["base"]["schedule"] == {"name": "cosine", "warmup_steps": study.KAPLAN_WARMUP_STEPS[size]}
        assert tuned["base"]["schedule"]["warmup_fraction"] == 0.05
        assert kaplan["grid"]["optim.lr"] == [study.kaplan_lr(size)] and study.kaplan_lr(size) in tuned["grid"]["optim.lr"]
        assert "6 * n_params_non_embedding)" in kaplan["derived"]["train.tokens"]
        assert "vocab_size * d_model" in tuned["derived"]["train.tokens"]
        assert len(tuned["grid"]["optim.lr"]) == (1 if size == "tiny" else 3)


def simulate(rng, a: float, sd: float, spread: float = 0.0, n_sizes: int = 5):
    """IsoFLOP points from L = h_j + s·(log C − log C_j) + k·(log N − v0 − a·(log C − mean))² + noise:
    three budgets, sizes around the optima; with `spread` each run's C moves from its budget's by up
    to `spread` in log, more for smaller models (as counting the head moves it)."""
    v0, k, s = np.log(5e4), 0.05, -0.05
    log_n = v0 + np.linspace(-1.3, 1.3, n_sizes)
    rows = []
    for j, c in enumerate(BUDGETS):
        shift = spread * np.linspace(1, 0.3, n_sizes)
        log_c = c + shift
        h = 3.0 - 0.05 * (c - BUDGETS.mean())
        loss = h + s * shift + k * (log_n - v0 - a * (log_c - BUDGETS.mean())) ** 2
        rows.append(pd.DataFrame({"N": np.exp(log_n), "C": np.exp(log_c), "budget": np.exp(c), "clean": loss}))
    frame = pd.concat(rows, ignore_index=True)
    return frame.assign(loss=frame["clean"] + sd * rng.standard_normal(len(frame)))


def fit(frame, loss="loss"):
    return study.fit_slope(frame["N"], frame["C"], frame[loss], frame["budget"], draws=200)


def coverage(hits: list[bool]) -> float:
    print(f"coverage {np.mean(hits):.3f} of {len(hits)}")
    return float(np.mean(hits))


def test_the_fit_recovers_a_and_covers_it_when_runs_of_a_budget_differ_in_c():
    rng = np.random.default_rng(1)
    exact = fit(simulate(rng, 0.6, 0.0, spread=0.3), loss="clean")
    assert exact is not None and exact.estimate.value == pytest.approx(0.6, abs=1e-6)
    assert "own C" in exact.estimate.method  # the re-count's fit, not the IsoFLOP one
    hits = []
    for _ in range(REPLICATES):
        found = fit(simulate(rng, 0.6, 0.004, spread=0.3))
        hits.append(found is not None and found.estimate.low <= 0.6 <= found.estimate.high)
    assert 0.9 <= coverage(hits) <= 0.995, coverage(hits)


def test_with_one_c_per_budget_the_fit_is_chinchillas():
    from testbed.stats.curves import isoflop_slope

    frame = simulate(np.random.default_rng(2), 0.5, 0.004)
    found = fit(frame)
    reference = isoflop_slope(frame["N"], frame["loss"], frame["budget"], draws=200)[0]
    assert found is not None and found.estimate == reference
    # its SE is the one the t interval was built from
    from scipy import stats as sps

    half = (reference.high - reference.low) / 2
    assert found.se * sps.t.ppf(0.975, found.df) == pytest.approx(half, rel=1e-4)


def test_the_paired_difference_of_two_countings_covers_the_noise_free_one():
    """One grid, its losses fitted twice: at one C per budget (as designed) and re-counted, each
    run's C moved. The target is the difference of the two fits on noise-free losses."""
    rng = np.random.default_rng(3)
    truth = simulate(rng, 0.5, 0.0, spread=0.3)
    design = truth.assign(C=truth["budget"], N=truth["N"] * np.tile(np.linspace(0.6, 0.9, 5), 3))
    target = fit(truth, "clean").estimate.value - fit(design, "clean").estimate.value
    assert abs(target) > 0.02  # the re-count moves the exponent
    hits = []
    for _ in range(REPLICATES):
        noise = 0.004 * rng.standard_normal(len(truth))
        first, second = fit(design.assign(loss=design["clean"] + noise)), fit(truth.assign(loss=truth["clean"] + noise))
        if first is None or second is None:  # a failed fit is a miss
            hits.append(False)
            continue
        d = study.paired_difference(first, second)
        hits.append(d.low <= target <= d.high)
    assert 0.9 <= coverage(hits) <= 0.995, coverage(hits)


def test_the_difference_of_independent_fits_covers_the_true_one():
    rng = np.random.default_rng(4)
    hits = []
    for _ in range(REPLICATES):
        first, second = fit(simulate(rng, 0.7, 0.004)), fit(simulate(rng, 0.5, 0.006))
        d = study.independent_difference(first, second)
        hits.append(d.low <= -0.2 <= d.high)
    assert 0.9 <= coverage(hits) <= 0.995, coverage(hits)


def analysis(a0, a3, change) -> Analysis:
    ms = [Measurement(f"a in N_opt ∝ C^a, {name}", *values) for name, values in
          zip(study.STEPS, [a0, (0.6, 0.5, 0.7), (0.6, 0.5, 0.7), a3])]
    return Analysis(Measurement("a of (3) − a of (0)", *change), ms)


@pytest.mark.parametrize("a0, a3, change, expected", [
    ((0.75, 0.65, 0.85), (0.5, 0.4, 0.6), (-0.25, -0.35, -0.15), "agree"),
    ((0.75, 0.65, 0.85), (0.62, 0.55, 0.69), (-0.13, -0.25, -0.01), "inconclusive"),  # lower, but not 0.5
    ((0.75, 0.55, 0.95), (0.5, 0.4, 0.6), (-0.25, -0.35, -0.15), "inconclusive"),  # Kaplan's not clearly high
    ((0.5, 0.45, 0.55), (0.5, 0.4, 0.6), (0.0, -0.1, 0.1), "disagree"),  # Kaplan's recipe is already low
    ((0.75, 0.65, 0.85), (0.9, 0.85, 0.95), (0.15, 0.05, 0.25), "disagree"),  # the corrections raise it
])
def test_the_verdict_follows_the_rule(a0, a3, change, expected):
    assert study.verdict(analysis(a0, a3, change))[0] == expected


def test_a_caveat_leaves_the_verdict_undecided():
    found = analysis((0.75, 0.65, 0.85), (0.5, 0.4, 0.6), (-0.25, -0.35, -0.15))
    found.headline.caveat = "LR at the edge of its grid"
    found.more[3].caveat = "LR at the edge of its grid"
    assert study.verdict(found)[0] == "inconclusive"


def test_counting_the_head_lowers_the_exponent_of_the_same_runs():
    """A Chinchilla law in head-counted N (alpha = beta: a = 0.5 there), the grid designed in Kaplan's
    count: read in Kaplan's count the exponent comes out higher; re-counted with the head, the same
    runs give what a grid designed in the head's count gives."""
    widths = np.array([16, 24, 32, 48, 64])
    non_emb = np.array([by_hand_non_embedding(int(d), 4) for d in widths], float)
    with_head = non_emb + 512 * widths

    def grid(n_design):
        budgets = np.repeat([7e10, 1.4e11, 2.8e11], 5)
        tokens = budgets / (6 * np.tile(n_design, 3))
        loss = 1.7 + 400 / np.tile(with_head, 3) ** 0.34 + 400 / tokens**0.34
        return budgets, tokens, loss

    budgets, tokens, loss = grid(non_emb)
    kaplan = study.fit_slope(np.tile(non_emb, 3), 6 * np.tile(non_emb, 3) * tokens, loss, budgets)
    recounted = study.fit_slope(np.tile(with_head, 3), 6 * np.tile(with_head, 3) * tokens, loss, budgets)
    budgets, tokens, loss = grid(with_head)
    designed = study.fit_slope(np.tile(with_head, 3), 6 * np.tile(with_head, 3) * tokens, loss, budgets)
    assert kaplan.estimate.value - recounted.estimate.value > 0.03
    assert recounted.estimate.value == pytest.approx(designed.estimate.value, abs=0.015)


def test_steps_read_the_two_sweeps_as_the_four_steps(tmp_path):
    """Kaplan and tuned sweeps' points (one seed; three LRs in the tuned one, the middle best in
    every cell but one) go through the whole analysis: four fits, the LR edge named."""
    rng = np.random.default_rng(5)
    widths = np.array([16, 24, 32, 48, 64])
    non_emb = np.array([by_hand_non_embedding(int(d), 4) for d in widths], float)
    rows = []
    for sweep, n_count in (("kaplan", non_emb), ("tuned", non_emb + 512 * widths)):
        for b in (7e10, 1.4e11, 2.8e11):
            d_tokens = b / (6 * n_count)
            base = 3.0 + 0.05 * (np.log(n_count) - np.log(5e4) - 0.6 * (np.log(b) - np.log(1.4e11))) ** 2
            for lr, penalty in ((3e-3, 0.02), (7e-3, 0.0), (1.6e-2, 0.03)) if sweep == "tuned" else ((7e-3, 0.0),):
                for i, d in enumerate(widths):
                    extra = -0.03 if (sweep, b, d, lr) == ("tuned", 7e10, 16, 1.6e-2) else penalty
                    rows.append({"sweep": sweep, "run_id": f"{sweep}-{b}-{d}-{lr}", "label_budget": b, "width": int(d),
                                 "peak_lr": lr, "N_non_embedding": non_emb[i], "vocab": 512,
                                 "N": non_emb[i] + 2 * 512 * d, "D": d_tokens[i], "C": 1.0,
                                 "loss": base[i] + extra + 0.002 * rng.standard_normal()})
    frame = pd.DataFrame(rows)
    fits, table, choice = study.steps(frame[frame["sweep"] == "kaplan"], frame[frame["sweep"] == "tuned"])
    assert all(f is not None for f in fits)
    assert fits[0].estimate.value == pytest.approx(0.6, abs=0.1)
    assert "own C" in fits[1].estimate.method and "own C" not in fits[0].estimate.method
    assert len(table) == 4 * 15
    a, differences = study.exponents(fits, choice.edges())
    assert "LR at the edge" in a[3].caveat and "LR" not in a[2].caveat
    assert "LR at the edge" in differences[-1].caveat
    assert "paired" in differences[0].how
    from testbed.study.base import Context

    tuned = frame[frame["sweep"] == "tuned"].reset_index(drop=True)
    found = study._report(Context(tmp_path, "cpu", {}), fits, table, choice, tuned)
    assert (tmp_path / "discrepancy.png").is_file() and "discrepancy.png" in found.plots
    assert study.verdict(found)[0] == "inconclusive"  # the edge LR leaves it undecided
