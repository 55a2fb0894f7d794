"""The vocab (v4) and repetition (v4) recipes: data that grows with the model, their LR check and
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

    (check,) = vocab.sweeps("cpu")
    ratios, grids = {}, {}
    for run in _runs(check):
        q = run.quantities
        assert q["vocab_size"] == vocab.reference("cpu") and run.config.train.seed == 0
        ratios.setdefault(q["d_model"], set()).add(q["planned_tokens"] / q["n_params_non_embedding"])
        grids.setdefault(q["d_model"], []).append(run.config.optim.lr)
    assert len(ratios) == len(vocab.MODELS["cpu"]) >= 3
    # the same tokens per parameter at the reference vocabulary for every size, to within a batch
    target = vocab.TOKENS_PER_PARAMETER["cpu"]
    assert all(abs(r - target) < 1 for rs in ratios.values() for r in rs), ratios
    # the LR check: three LRs a factor 2.5 apart around a centre falling as 1/d_model
    for d, lrs in grids.items():
        low, mid, high = sorted(lrs)
        assert mid == pytest.approx(vocab.LR_CENTRE["cpu"] * 32 / d) and high / mid == pytest.approx(2.5)
    assert "vocab-lr" in vocab.brackets("cpu")


def test_vocab_profiles_train_every_vocabulary_at_the_chosen_lr_on_their_own_seed():
    """Each size's profile at the LR step the check chose for it (here +1 for d_model 24, -2 beyond the
    check's grid for 48), seed 1 for initialisation and data order, the same FLOPs at every vocabulary."""
    from testbed.study.builtin import vocab

    steps = {24: 1, 32: 0, 48: -2, 64: 0}
    specs = vocab.profile_sweeps("cpu", steps)
    assert [s["name"] for s in specs] == [f"vocab-{v}" for v in vocab.VOCAB_LADDER["cpu"]]
    flops = {}
    for spec in specs:
        for run in _runs(spec):
            d = run.config.model.d_model
            assert run.config.train.seed == run.config.data.seed == vocab.PROFILE_SEED
            assert run.config.optim.lr == pytest.approx(vocab.LR_CENTRE["cpu"] * 32 / d * 2.5 ** steps[d])
            flops.setdefault(d, []).append(run.quantities["planned_flops"])
    assert all(max(f) / min(f) < 1.05 for f in flops.values()), flops


def _vocab_finals(best_step: int):
    """A synthetic study: V_opt doubling with each 4x in N_nv; at the reference vocabulary the LR
    check's best step is `best_step`; the profiles (one sweep per vocabulary) at that step."""
    import numpy as np

    from testbed.study.builtin import vocab

    noise = np.random.default_rng(0)
    sweeps: dict[str, list[dict]] = {}
    for i, (n, d) in enumerate([(1.4e4, 24), (5.6e4, 48), (2.2e5, 96)]):
        best = np.log(1024 * 2 ** i)

        def row(v, step, seed, n=n, d=d, best=best):
            bpb = 1.5 + 0.05 * (np.log(v) - best) ** 2 + 0.02 * abs(step - best_step) + noise.normal(0, 0.002)
            return {"run_id": f"{n}-{v}-{step}-{seed}", "N_non_embedding": n, "width": d, "vocab": v, "bpb": bpb,
                    "loss": bpb, "C": 1e12, "D": 20 * n, "peak_lr": 6e-3 * 2.5 ** step, "label_lr_step": step}
        sweeps.setdefault("vocab-lr", []).extend(row(vocab.reference("cpu"), s, 0) for s in (-1, 0, 1))
        for v in vocab.VOCAB_LADDER["cpu"]:
            sweeps.setdefault(f"vocab-{v}", []).append(row(v, best_step, 1))
    return {k: pd.DataFrame(v) for k, v in sweeps.items()}


@pytest.mark.parametrize("best_step", [0, 1])
def test_vocab_lr_at_the_edge_of_its_check_is_a_caveat(tmp_path, monkeypatch, best_step):
    from testbed.study.builtin import vocab

    frames = _vocab_finals(best_step)
    monkeypatch.setattr(Context, "finals", lambda self, sweep=None: frames[sweep])
    analysis = vocab.analyse(Context(tmp_path, "cpu", {}))
    assert [r["V_opt"] > 0 for r in analysis.tables["optimal vocabulary"]] == [True] * 3
    assert len(analysis.tables["points"]) == 15  # the profiles: five vocabularies per size
    assert {r["lr step"] for r in analysis.tables["learning rates"]} == {best_step}
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
