"""The ablation (Peri-LN) and shape studies' designs, checked without training: shapes inside
Kaplan's band, LR grids that can bracket an optimum, and the LR sensitivity beside the multiplier."""

from __future__ import annotations

import math

import pandas as pd
import pytest


@pytest.mark.parametrize("size", ["cpu", "gpu-min", "gpu"])
def test_shapes_have_two_layers_or_more_inside_kaplans_band(size):
    from testbed.config import ModelConfig
    from testbed.model.counting import count_params
    from testbed.study.builtin import shape

    pairs = shape.shapes(size)
    assert len(pairs) >= 3 and len(shape.lrs(size)) >= 3
    assert all(layers >= 2 and 19 <= d / layers <= 200 for d, layers in pairs), pairs
    counts = [count_params(ModelConfig(d_model=d, n_layers=layers, n_heads=1, vocab_size=512)) for d, layers in pairs]
    n = [c.non_embedding for c in counts]
    assert max(n) / min(n) < 1.2, n  # about the same non-embedding N
    if size == "cpu":
        assert len(pairs) >= 4 and all(c.embedding < c.non_embedding for c in counts)
        tree = shape.sweeps(size)[0]["base"]
        assert tree["model"]["vocab_size"] == 512 and "bpe512" in tree["data"]["path"]


def test_ablation_arms_have_their_own_grids_sharing_the_middle_and_seeds():
    from testbed.study.builtin import ablation

    specs = ablation.sweeps("cpu")
    assert [s["name"] for s in specs] == ["ablation-pre", "ablation-peri"]
    pre, peri = (s["grid"]["optim.lr"] for s in specs)
    assert len(pre) >= 4 and len(peri) >= 4 and max(peri) > max(pre) and len(set(pre) & set(peri)) >= 3
    assert all(s["grid"]["train.seed"] == [0, 1] for s in specs)
    assert all(s["base"]["train"]["divergence_nats"] is None and s["base"]["model"]["vocab_size"] == 512
               for s in specs)
    assert all(n >= 6 for _, n, _ in ablation.LADDER["cpu"])


def test_lr_sensitivity_over_the_shared_lrs_against_a_uniform_prediction():
    """Each arm's sensitivity is read over the LRs both grids hold, with L_init = ln(vocab): a loss
    above it counts as L_init, and an LR only one arm tried is left out."""
    from testbed.study.builtin import ablation

    rows = []
    losses = {"pre": {1e-3: 3.0, 2e-3: 4.0, 4e-3: 7.0}, "peri": {2e-3: 4.2, 4e-3: 4.0, 8e-3: 3.0}}
    for arm, by_lr in losses.items():
        for budget in (1e9, 2e9):
            for seed in (0, 1):
                rows += [{"label_norm_placement": arm, "label_budget": budget, "label_seed": seed, "peak_lr": lr,
                          "loss": loss + 0.01 * seed, "vocab": 512} for lr, loss in by_lr.items()]
    frame = pd.DataFrame(rows)
    finals = [frame[frame["label_norm_placement"] == arm] for arm in ("pre", "peri")]
    more, table = ablation._sensitivity(finals)
    l_init = math.log(512)
    # 7.0 capped at L_init (seed 1's best loss is 0.01 higher); 1e-3 and 8e-3 left out
    expected = {"pre": (l_init - 4.005) / 2, "peri": 0.2 / 2}
    by_name = {m.name.split(" (")[0]: m for m in more}
    assert by_name["LR sensitivity of pre"].value == pytest.approx(expected["pre"], abs=1e-6)
    assert by_name["LR sensitivity of peri"].value == pytest.approx(expected["peri"], abs=1e-6)
    difference = by_name["LR sensitivity pre − peri"]
    assert difference.value == pytest.approx(expected["pre"] - expected["peri"], abs=1e-6)
    assert difference.low is not None and difference.low <= difference.value <= difference.high
    assert {r["arm"] for r in table} == {"pre", "peri"} and all(r["seeds"] == 2 for r in table)
    # one seed: the spread over budgets is not seed noise, so no interval
    more, _ = ablation._sensitivity([f[f["label_seed"] == 0] for f in finals])
    assert all(m.low is None for m in more)
