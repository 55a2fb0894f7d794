"""The annealing (v3) and power (v3) studies' own machinery, without training: the momentum
profile, the two laws' joined inputs, the rule's reading, and power's tune-then-freeze choice."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from testbed.study.base import Analysis, Measurement
from testbed.study.builtin import annealing, power


def _schedule(kind: str, total: int = 1200, peak: float = 1e-2, warmup: int = 50) -> np.ndarray:
    steps = np.arange(total)
    lr = np.full(total, peak)
    lr[:warmup] = peak * (steps[:warmup] + 1) / warmup
    if kind == "cosine":
        p = (steps[warmup:] - warmup) / (total - warmup)
        lr[warmup:] = peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * p)))
    if kind == "wsd":
        start = int(0.8 * total)
        lr[start:] = peak * (1 - np.sqrt((steps[start:] - start) / (total - start))) + 1e-6
    return lr


def _curve(kind: str, decay: float, seed: int = 0) -> dict:
    """A curve the annealing law draws at momentum decay `decay`, evaluated every 25 steps."""
    from testbed.fit.laws.annealing import lr_areas

    lrs = _schedule(kind)
    at = np.arange(75, len(lrs) + 1, 25)
    s1, s2 = lr_areas(np.arange(1, len(lrs) + 1), lrs, at, decay)
    loss = 2.0 + 1.5 * s1 ** -0.4 - 60.0 * s2
    return {"arm": kind, "seed": seed, "step": at, "loss": loss, "lrs": lrs, "final": float(loss[-1])}


def test_annealing_profile_recovers_the_momentum_decay():
    """Curves drawn at a 100-step time constant: the profile picks it, and the fitted law
    predicts the held-out WSD curve almost exactly."""
    truth = annealing.LAMBDAS[2]
    assert round(1 / (1 - truth)) == 100
    results, inputs, profile = annealing._fit([_curve("constant", truth), _curve("cosine", truth)])
    assert min(profile, key=lambda r: r["objective"])["lambda"] == truth
    held_out = _curve("wsd", truth)
    predicted = results["annealing"].predict(inputs["annealing"](held_out))
    assert np.max(np.abs(predicted / held_out["loss"] - 1)) < 2e-3
    assert np.all(np.isfinite(results["multipower"].predict(inputs["multipower"](held_out))))


def test_joined_multipower_inputs_predict_each_curve_as_alone():
    """`_join` shifts each curve's drop-term ends past the terms of the curves before it."""
    from testbed.fit.laws.multipower import MULTIPOWER

    curves = [_curve(kind, 0.99) for kind in ("cosine", "constant", "wsd")]
    xs = [annealing._inputs("multipower", c) for c in curves]
    theta = np.array([[0.5, 0.3, 0.4, 3.0, 0.5, 0.6, 0.5]])
    alone = np.concatenate([MULTIPOWER.predict_loss(theta, x).ravel() for x in xs])
    together = MULTIPOWER.predict_loss(theta, annealing._join(xs)).ravel()
    assert together == pytest.approx(alone, rel=1e-12)


def test_annealing_rule_reads_only_the_annealing_laws_predictions():
    def m(name, value):
        return Measurement(name, value, value - 0.001, value + 0.001)

    good = m("annealing law, wsd: mean relative prediction error", 0.004)
    others = [m("multi-power law, wsd: mean relative prediction error (beside the rule)", 0.05),
              m("annealing law, cosine: mean relative fit error", 0.05),
              m("cosine − constant final validation loss (beside the rule)", 0.05)]
    assert annealing.verdict(Analysis(good, others))[0] == "agree"
    bad = m("annealing law, power: mean relative prediction error", 0.05)
    assert annealing.verdict(Analysis(bad, [good, *others]))[0] == "disagree"


def test_annealing_cpu_runs_are_long_and_warm_up_in_steps():
    specs = annealing.sweeps("cpu")
    for spec in specs:
        tree = spec["base"]
        assert tree["model"]["vocab_size"] == 512 and "bpe512" in tree["data"]["path"]
        assert tree["schedule"]["warmup_steps"] == annealing.WARMUP_STEPS["cpu"]
        assert tree["train"]["tokens"] // tree["train"]["global_batch_tokens"] == 2400  # past 1000-step lambda
    assert {s["base"]["schedule"]["name"] for s in specs} == set(annealing.FITTED + annealing.PREDICTED)


def _tune_rows() -> pd.DataFrame:
    """Losses of a 3 x 3 (a, cap) grid at two seeds: seed 0 prefers (a1, 0.016), seed 1 (a1, 0.008)."""
    a = power.power_as("cpu")
    rows = []
    for seed, best in ((0, (a[1], 0.016)), (1, (a[1], 0.008))):
        for ai in a:
            for cap in power.caps("cpu"):
                loss = 4.0 + abs(np.log(ai / best[0])) + abs(np.log(cap / best[1]))
                rows.append({"label_power_a": ai, "peak_lr": cap, "label_seed": seed, "loss": loss})
    return pd.DataFrame(rows)


def test_power_tunes_once_and_reads_each_seed_at_the_others_choice():
    tune = _tune_rows()
    a = power.power_as("cpu")
    assert power.tuned(tune) in {(a[1], 0.008), (a[1], 0.016)}
    picked = power._cross_fitted(tune).set_index("label_seed")
    assert picked.loc[0, "peak_lr"] == 0.008 and picked.loc[1, "peak_lr"] == 0.016  # the other seed's choice
    assert power._edges(tune, a[1], 0.016) == []
    edges = power._edges(tune, a[0], 0.032)
    assert len(edges) == 2 and edges[0].startswith("power's tuned a") and edges[1].startswith("power's tuned cap")


def test_power_settings_span_four_times_in_batch_and_horizon_with_mup():
    size = "cpu"
    assert power.batches(size)[1] == 4 * power.batches(size)[0]
    assert power.horizons(size)[1] == 4 * power.horizons(size)[0]
    cosine, tune = power.sweeps(size)
    frozen = power.frozen_sweep(size, 0.1, 0.016)
    for spec in (cosine, tune, frozen):
        model = spec["base"]["model"]
        assert model["parametrization"] == "mup" and model["mup_base_width"] == model["d_model"]
        assert spec["base"]["schedule"]["warmup_steps"] == power.WARMUP_STEPS[size]
    # the tuning sweep sits in the first setting; the frozen arm covers every other one
    assert (tune["base"]["train"]["global_batch_tokens"], tune["base"]["train"]["tokens"]) == \
        (power.batches(size)[0], power.horizons(size)[0])
    settings = list(zip(frozen["zip"]["train.global_batch_tokens"], frozen["zip"]["train.tokens"]))
    assert len(settings) == 3 and (power.batches(size)[0], power.horizons(size)[0]) not in settings
    # the middle a meets the middle cap at 10% of the tuning setting's horizon
    sequences = power.batches(size)[0] // 128
    lr = sequences * power.power_as(size)[1] * (0.1 * power.horizons(size)[0]) ** power.POWER_B
    assert lr == pytest.approx(power.caps(size)[1], rel=1e-3)
