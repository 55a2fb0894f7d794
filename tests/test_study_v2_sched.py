"""The chinchilla (v5) and wsd (v3) recipes: LR grids per cell, beta2 at small batch, warmup in
steps shared by runs and branches, and the weight-EMA comparison beside wsd's rule. Fast: sweeps
are expanded, not trained."""

from __future__ import annotations

import pandas as pd
import pytest

from testbed.study.base import Analysis, Context, Measurement
from testbed.study.builtin import chinchilla, wsd
from testbed.study.recipes import BATCH, SMALL_VOCAB
from testbed.sweep.spec import load_sweep


@pytest.mark.parametrize("size", ["cpu", "gpu"])
def test_chinchilla_tries_three_lrs_in_every_cell(size: str) -> None:
    runs = load_sweep(chinchilla.sweeps(size)[0]).runs
    cells: dict[tuple, set[float]] = {}
    for r in runs:
        cells.setdefault((r.config.train.tokens, r.config.model.d_model), set()).add(r.config.optim.lr)
    assert len(cells) == len(chinchilla.budgets(size)) * len(chinchilla.widths(size))
    for grid in cells.values():
        low, mid, high = sorted(grid)
        assert mid / low == pytest.approx(chinchilla.LR_RATIO, rel=1e-5)
        assert high / mid == pytest.approx(chinchilla.LR_RATIO, rel=1e-5)
    # the centre falls as 1/d_model: the widest model's middle LR below the narrowest's
    widths = chinchilla.widths(size)
    middle = {d: sorted(g)[1] for (_, d), g in cells.items()}
    assert middle[widths[-1]] * widths[-1] == pytest.approx(middle[widths[0]] * widths[0], rel=1e-5)


def test_chinchilla_cpu_has_beta2_for_its_small_batch():
    runs = load_sweep(chinchilla.sweeps("cpu")[0]).runs
    assert {tuple(r.config.optim.betas) for r in runs} == {(0.9, chinchilla.CPU_BETA2)}
    assert {r.config.model.vocab_size for r in runs} == {SMALL_VOCAB}
    assert {tuple(r.config.optim.betas) for r in load_sweep(chinchilla.sweeps("gpu")[0]).runs} == {(0.9, 0.95)}


@pytest.mark.parametrize("size", ["tiny", "cpu", "gpu-min", "gpu"])
def test_wsd_warmup_is_the_same_steps_everywhere(size):
    """Every arm run and the long run warm up over the same steps, and each branch ends exactly
    at a shorter duration: a branch is the separate WSD run of its length up to its cooldown."""
    sweeps = [*wsd.sweeps(size), wsd.long_sweep(size, wsd.lrs(size)[0])]
    for spec in sweeps:
        for r in load_sweep(spec).runs:
            assert r.config.schedule.warmup_steps == wsd.WARMUP_STEPS[size]
            assert r.config.schedule.warmup_fraction is None
    ends = [d // BATCH[size] for d in wsd.durations(size)[:-1]]
    assert [s / (1 - wsd.DECAY) for s in wsd.branch_steps(size)] == ends
    assert wsd.WARMUP_STEPS[size] < wsd.branch_steps(size)[0]
    long_run = load_sweep(wsd.long_sweep(size, 1e-3)).runs[0].config
    assert long_run.train.ema_decay == wsd.ema_decay(size)
    steps = {t // BATCH[size] for t in long_run.checkpoint.at_tokens}
    assert steps == {*wsd.branch_steps(size), *ends, *wsd.average_steps(size)}
    # the last-K average at each branch end: K saved steps over the branch's window, the newest at the end
    for end, start in zip(ends, wsd.branch_steps(size)):
        window = sorted(s for s in steps if start < s <= end)
        assert len(window) == wsd.AVERAGE_LAST and window[-1] == end, (size, end, window)


def test_wsd_cpu_trains_more_tokens_per_parameter():
    runs = load_sweep(wsd.sweeps("cpu")[0]).runs
    model = runs[0].config.model
    assert model.vocab_size == SMALL_VOCAB
    non_embedding = 12 * model.n_layers * model.d_model ** 2
    assert min(wsd.durations("cpu")) / non_embedding > 8  # v2: 0.7 to 2.7


def test_wsd_weight_ema_is_beside_the_rule(tmp_path):
    """The EMA gap is measured per branch end, paired by parent run, and no verdict rests on it."""
    parents = [f"/x/long/seed-{s}" for s in (0, 1)]
    rows = []
    for p, shift in zip(parents, (0.0, 0.01)):
        rows += [{"run_dir": p, "point_kind": "ema", "D": 100, "loss": 3.0 + shift, "ema_decay": 0.9},
                 {"run_dir": p, "point_kind": "intermediate", "D": 100, "loss": 3.3 + shift, "ema_decay": 0.9},
                 {"run_dir": p, "point_kind": "ema", "D": 200, "loss": 2.8 + shift, "ema_decay": 0.9}]
    points = pd.DataFrame(rows)
    sqrt = pd.DataFrame([{"parent": p, "D": 100, "loss": 2.9 + shift} for p, shift in zip(parents, (0.0, 0.012))])

    class Fake(Context):
        def points(self, sweep=None):
            return points

    found, table = wsd._averaging(Fake(tmp_path, "tiny", {}), sqrt)
    assert len(found) == 1 and "weight EMA (decay 0.9)" in found[0].name
    assert found[0].value == pytest.approx(3.005 / 2.906 - 1, rel=1e-3)
    assert table[0]["ema_recovered"] == pytest.approx((3.305 - 3.005) / (3.305 - 2.906), rel=1e-3)
    # the last-K checkpoint average beside it, read from the run's average points of that K
    rows += [{"run_dir": p, "point_kind": "average", "D": 100, "loss": 2.95 + shift, "average_last": wsd.AVERAGE_LAST}
             for p, shift in zip(parents, (0.0, 0.01))]
    rows += [{"run_dir": parents[0], "point_kind": "average", "D": 100, "loss": 9.0, "average_last": 2}]
    points = pd.DataFrame(rows)
    found, table = wsd._averaging(Fake(tmp_path, "tiny", {}), sqrt)
    assert [m.name.split(" of the")[0] for m in found] == ["weight EMA (decay 0.9)", f"last-{wsd.AVERAGE_LAST} checkpoint average"]
    assert found[1].value == pytest.approx(2.955 / 2.906 - 1, rel=1e-3)
    assert table[0]["average_recovered"] == pytest.approx((3.305 - 2.955) / (3.305 - 2.906), rel=1e-3)
    # far outside every tolerance, yet the verdict is the rule's alone
    ok = Measurement("largest relative loss gap WSD − cosine (D=100)", 0.0, -0.001, 0.001)
    far = Measurement(found[0].name, 0.5, 0.4, 0.6)
    assert wsd.verdict(Analysis(ok, [far]))[0] == "agree"


def test_wsd_branches_are_a_check_of_construction_not_in_the_rule():
    """v4: a branch is its separate run (warmup in steps), so their gap decides nothing; the rule
    reads WSD against cosine and 1-sqrt against linear."""
    ok = Measurement("largest relative loss gap WSD − cosine (D=100)", 0.0, -0.001, 0.001)
    branch = Measurement("branch vs separate WSD run at D=100 (a check of construction, not in the rule)", 0.2, 0.1, 0.3)
    sqrt = Measurement("1-sqrt vs linear cooldown branch at D=100", -0.01, -0.02, -0.005)
    assert wsd.verdict(Analysis(ok, [branch, sqrt]))[0] == "agree"
    linear_wins = Measurement("1-sqrt vs linear cooldown branch at D=100", 0.01, 0.005, 0.02)
    assert wsd.verdict(Analysis(ok, [branch, linear_wins]))[0] == "disagree"


def _law_sweep(pairs, law: dict, sd: float, seed: int = 0) -> pd.DataFrame:
    """One run per (N, D) with losses from L = E + A/N^alpha + B/D^beta and lognormal scatter."""
    import numpy as np

    n, d = (np.array(v, float) for v in zip(*pairs))
    clean = law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]
    loss = clean * np.exp(sd * np.random.default_rng(seed).standard_normal(len(n)))
    return pd.DataFrame({"run_id": [f"r{k}" for k in range(len(n))], "N": n, "D": d, "C": 6 * n * d, "loss": loss})


def test_approach3_coverage_is_measured_at_the_studys_own_design():
    """On a grid of sizes and token counts the wild bootstrap covers (as tests/test_fit_recovery.py
    measures); on an IsoFLOP design whose N and D move together along three budgets a factor 4
    apart the same interval covers far less, and Approach 3's figures then carry a caveat."""
    import numpy as np

    grid = [(n, d) for n in np.logspace(7, 9, 4) for d in np.logspace(9, 11, 3)]
    chinchilla_like = {"E": 2.0, "A": 400.0, "B": 1500.0, "alpha": 0.34, "beta": 0.36}
    a, b, _ = chinchilla._approach3(_law_sweep(grid, chinchilla_like, sd=0.01))
    assert "sweeps simulated from that law" in a.how and not a.caveat, a
    # the cpu study's design (three budgets, four widths) and the law v6 fitted there, at its scatter
    isoflop = [(n, c / (6 * n)) for c in (2e11, 4e11, 8e11) for n in (3.3e4, 5.2e4, 8.6e4, 1.6e5)]
    fitted_there = {"E": 2.452, "A": 1.493e8, "B": 1920.0, "alpha": 1.878, "beta": 0.5833}
    a, b, _ = chinchilla._approach3(_law_sweep(isoflop, fitted_there, sd=0.015))
    assert "coverage at this design" in a.caveat and a.caveat == b.caveat, a
    assert chinchilla.verdict(Analysis(Measurement("a in N_opt ∝ C^a, Approach 2 (joint IsoFLOP fit)", 0.5, 0.4, 0.6),
                                       [a]))[0] == "inconclusive"
