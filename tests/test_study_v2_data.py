"""The vocab (v3) and repetition (v4) recipes: data that grows with the model, their LR check and
their per-size rules, without training."""

from __future__ import annotations

import pandas as pd
import pytest

from testbed.study.base import Analysis, Context, Measurement


def _runs(spec):
    from testbed.sweep.spec import load_sweep

    return load_sweep(spec).runs


def test_vocab_budgets_give_every_size_the_same_tokens_per_parameter():
    from testbed.study.builtin import vocab

    specs = vocab.sweeps("cpu")
    ref = next(s for s in specs if s["name"] == f"vocab-{vocab.reference('cpu')}")
    ratios, grids = {}, {}
    for run in _runs(ref):
        q = run.quantities
        ratios.setdefault(q["d_model"], set()).add(q["planned_tokens"] / q["n_params_non_embedding"])
        grids.setdefault(q["d_model"], []).append(run.config.optim.lr)
    assert len(ratios) == len(vocab.MODELS["cpu"]) >= 3
    # 20 tokens per parameter at the reference vocabulary, to within a batch
    assert all(abs(r - 20) < 1 for rs in ratios.values() for r in rs), ratios
    # the LR check: three LRs a factor 2.5 apart around a centre falling as 1/d_model
    for d, lrs in grids.items():
        low, mid, high = sorted(lrs)
        assert mid == pytest.approx(vocab.LR_CENTRE["cpu"] * 32 / d) and high / mid == pytest.approx(2.5)
    # the other vocabularies: the centre only, at the same FLOPs (fewer tokens with a larger head)
    for spec in specs:
        if spec is ref:
            continue
        runs = _runs(spec)
        assert len(runs) == len(vocab.MODELS["cpu"]) and {r.labels["lr_step"] for r in runs} == {0}


def _vocab_finals(best_step: int) -> pd.DataFrame:
    """A synthetic profile: V_opt doubling with each 4x in N_nv, the centre LR the best at the
    reference vocabulary unless `best_step` says otherwise."""
    import numpy as np

    from testbed.study.builtin import vocab

    noise = np.random.default_rng(0)
    rows = []
    for i, (n, d) in enumerate([(1.4e4, 24), (5.6e4, 48), (2.2e5, 96)]):
        best = np.log(1024 * 2 ** i)
        for v in vocab.VOCAB_LADDER["cpu"]:
            steps = [-1, 0, 1] if v == vocab.reference("cpu") else [0]
            for step in steps:
                bpb = 1.5 + 0.05 * (np.log(v) - best) ** 2 + 0.02 * abs(step - best_step) + noise.normal(0, 0.002)
                rows.append({"run_id": f"{n}-{v}-{step}", "N_non_embedding": n, "width": d, "vocab": v,
                             "bpb": bpb, "loss": bpb, "C": 1e12, "D": 20 * n, "peak_lr": 6e-3 * 2.5 ** step,
                             "label_lr_step": step})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("best_step", [0, 1])
def test_vocab_lr_at_the_edge_of_its_check_is_a_caveat(tmp_path, monkeypatch, best_step):
    from testbed.study.builtin import vocab

    monkeypatch.setattr(Context, "finals", lambda self, sweep=None: _vocab_finals(best_step))
    analysis = vocab.analyse(Context(tmp_path, "cpu", {}))
    assert [r["V_opt"] > 0 for r in analysis.tables["optimal vocabulary"]] == [True] * 3
    assert len(analysis.tables["points"]) == 15  # the profiles: the centre LR only
    edged = "LR at the edge" in analysis.headline.caveat
    assert edged == (best_step != 0)
    if edged:
        assert vocab.verdict(analysis)[0] == "inconclusive"


def test_repetition_repeats_a_quarter_of_compute_optimal_data_at_two_sizes():
    from testbed.study.builtin import repetition
    from testbed.study.recipes import BATCH

    specs = repetition.sweeps("cpu")
    assert len(specs) == 2 * len(repetition.MODELS["cpu"]) and len(repetition.MODELS["cpu"]) >= 2
    for repeated, control in zip(specs[::2], specs[1::2]):
        runs = _runs(repeated)
        u = runs[0].quantities["unique_tokens"]
        n = runs[0].quantities["n_params_non_embedding"]
        assert u % BATCH["cpu"] == 0 and abs(4 * u / n - 20) < 1  # 4 epochs at ~20 tokens per parameter
        assert sorted({r.quantities["planned_tokens"] // u for r in runs}) == [1, 2, 4, 8, 16]
        assert {r.labels["seed"] for r in runs} == {0, 1}
        assert sorted({r.quantities["planned_tokens"] // u for r in _runs(control)}) == [2, 4, 8, 16]
        assert all(r.quantities["vocab_size"] == 512 for r in runs)


def _gap(e: int, n: str, low: float, high: float) -> Measurement:
    return Measurement(f"repeated − unique at {e} epochs (N_nv {n})", (low + high) / 2, low, high)


def _star(n: str, low: float, high: float) -> Measurement:
    return Measurement(f"R_D* of the data-constrained law (N_nv {n}; paper: 15.4)", (low + high) / 2, low, high)


@pytest.mark.parametrize("small_four, expected", [((-0.01, 0.005), "agree"), ((0.02, 0.03), "disagree"),
                                                   ((0.0, 0.02), "inconclusive")])
def test_repetition_rule_holds_at_every_size(small_four, expected):
    from testbed.study.builtin import repetition

    four = _gap(4, "5.6e+04", -0.01, 0.008)
    more = [_gap(4, "1.4e+04", *small_four), _gap(16, "1.4e+04", 0.05, 0.08), _gap(16, "5.6e+04", 0.1, 0.2),
            _gap(2, "5.6e+04", -0.01, 0.01), _star("1.4e+04", 5, 20), _star("5.6e+04", 4, 30)]
    assert repetition.verdict(Analysis(four, more))[0] == expected
    # the most epochs not clearly worse at one size: not an agreement
    if expected == "agree":
        soft = [m if m.name != more[2].name else _gap(16, "5.6e+04", 0.0, 0.02) for m in more]
        assert repetition.verdict(Analysis(four, soft))[0] == "inconclusive"
