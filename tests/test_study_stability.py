"""The stability study's measures: the paper's LR sensitivity, the attention logits it reads off
a model (checked against the attention's own output) and the output-logit statistics."""

from __future__ import annotations

import math

import pytest
import torch

from testbed.config import ModelConfig
from testbed.model.transformer import Transformer
from testbed.study.base import Analysis, Measurement, lr_sensitivity
from testbed.study.builtin.stability import (
    GROWTH,
    logit_stats,
    summarise,
    verdict,
)


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    fields = {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 16, "vocab_size": 40, **overrides}
    return Transformer(ModelConfig(**fields)).eval()


def test_lr_sensitivity_is_the_mean_gap_to_the_best_capped_loss():
    assert lr_sensitivity([3.0, 3.0, 3.0], l_init=5.0) == 0.0
    assert lr_sensitivity([4.0, 3.0, 3.5], l_init=5.0) == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    # a loss above L_init, or a non-finite one (a diverged run), counts as L_init
    assert lr_sensitivity([3.0, 9.0, math.nan], l_init=5.0) == pytest.approx((0 + 2 + 2) / 3)
    assert lr_sensitivity([3.0, math.inf], l_init=5.0) == pytest.approx(1.0)
    # nothing below L_init: every LR counts as diverged, no spread
    assert lr_sensitivity([7.0, math.nan], l_init=5.0) == 0.0
    # a wider stable band is a lower sensitivity
    narrow = lr_sensitivity([3.5, 3.0, 6.0, math.nan], l_init=5.0)
    wide = lr_sensitivity([3.5, 3.0, 3.2, 4.0], l_init=5.0)
    assert wide < narrow


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}, {"n_kv_heads": 2}])
def test_attention_logits_reproduce_the_attention_output(overrides):
    """softmax of the logits, times v, through the output projection, is the sublayer's output:
    the logits are the ones its forward uses (scale, QK-norm, rotary, grouped keys, mask)."""
    model = tiny_model(**overrides)
    attn = model.blocks[0].attn
    x = torch.randn(3, 12, 32)
    logits = attn.logits(x)
    B, T, _ = x.shape
    v = attn.qkv(x)[..., -attn.kv_heads * attn.head_dim:].view(B, T, attn.kv_heads, attn.head_dim).transpose(1, 2)
    v = v.repeat_interleave(attn.n_heads // attn.kv_heads, dim=1)
    y = torch.softmax(logits, dim=-1) @ v
    with torch.no_grad():
        expected = attn(x)
    assert logits.shape == (B, attn.n_heads, T, T)
    assert torch.isinf(logits[..., 0, 1:]).all()  # the first position sees only itself
    torch.testing.assert_close(attn.out(y.transpose(1, 2).reshape(B, T, -1)), expected, atol=1e-5, rtol=1e-4)


def test_logit_stats_grow_with_the_query_key_weights_and_qk_norm_bounds_them():
    windows = torch.randint(0, 40, (4, 13))
    plain, normed = tiny_model(), tiny_model(qk_norm=True)
    before = {"plain": logit_stats(plain, windows), "qk_norm": logit_stats(normed, windows)}
    with torch.no_grad():
        logits = plain(windows[:, :-1])
        loss = float(plain(windows[:, :-1], windows[:, 1:]))
    assert before["plain"]["mean_z"] == pytest.approx(float(torch.logsumexp(logits, -1).mean()), rel=1e-5)
    assert before["plain"]["max_output_logit"] == pytest.approx(float(logits.max()), rel=1e-5)
    assert before["plain"]["batch_loss"] == pytest.approx(loss, rel=1e-5)
    with torch.no_grad():  # what a high LR does to q and k: scale their projections up 10x
        for model in (plain, normed):
            for block in model.blocks:
                block.attn.qkv.weight[: 2 * 32].mul_(10.0)
            model.head.weight.mul_(10.0)
    after = {"plain": logit_stats(plain, windows), "qk_norm": logit_stats(normed, windows)}
    assert after["plain"]["max_attn_logit"] == pytest.approx(100 * before["plain"]["max_attn_logit"], rel=0.2)
    # QK-norm normalises each head's q and k: the scale of their projections drops out (up to its eps)
    assert after["qk_norm"]["max_attn_logit"] == pytest.approx(before["qk_norm"]["max_attn_logit"], rel=1e-2)
    assert after["plain"]["max_output_logit"] > 5 * before["plain"]["max_output_logit"]


def analysis(difference: tuple[float, float, float], growth: tuple[float, float, float]) -> Analysis:
    return Analysis(Measurement("LR sensitivity plain − qk_norm at 6 layers", *difference),
                    [Measurement("attention-logit growth of plain at 6 layers (top LR / bottom LR)", *growth)])


def test_verdict_rule():
    grows = (10 * GROWTH, 5 * GROWTH, 20 * GROWTH)
    assert verdict(analysis((0.3, 0.1, 0.5), grows))[0] == "agree"
    assert verdict(analysis((-0.3, -0.5, -0.1), grows))[0] == "disagree"
    assert verdict(analysis((0.3, -0.1, 0.5), grows))[0] == "inconclusive"
    # QK-norm helps, but plain's attention logits did not clearly grow: not the paper's mechanism
    assert verdict(analysis((0.3, 0.1, 0.5), (GROWTH, 0.5 * GROWTH, 3 * GROWTH)))[0] == "inconclusive"
    assert verdict(analysis((-0.3, -0.5, -0.1), (1.0, 0.9, 1.1)))[0] == "disagree"


def test_summary_of_two_seeds_finds_the_wider_band(tmp_path):
    """Plain diverges (a loss at L_init) at the top two LRs at the deeper depth, QK-norm at none:
    the paired difference's interval lies above 0, plain's attention logits grow 1000x, and the
    rule agrees; the tables and the plot are written."""
    import pandas as pd

    lrs = [1e-3, 1e-2, 1e-1, 1.0]
    rows = []
    for arm, seed, depth in [(a, s, d) for a in ("plain", "qk_norm", "z_loss") for s in (0, 1) for d in (2, 6)]:
        jitter = 0.01 * seed
        for i, lr in enumerate(lrs):
            broken = arm != "qk_norm" and depth == 6 and i >= 2
            loss = 6.5 if broken else [4.0, 3.5, 3.6, 3.9][i] + jitter
            attn = (10.0 ** i) * (1 + jitter) if arm != "qk_norm" else 5.0 + i + jitter
            rows.append({"label_arm": arm, "label_seed": seed, "depth": depth, "peak_lr": lr, "loss": loss,
                         "L_init": 6.3 + jitter, "max_attn_logit": attn, "mean_z": 6.0, "max_output_logit": 3.0})
    analysis = summarise(pd.DataFrame(rows), tmp_path)
    headline = analysis.headline
    assert headline.name == "LR sensitivity plain − qk_norm at 6 layers"
    # plain: gaps 0.5, 0, 2.8, 2.8 to its best 3.5 (the broken LRs capped at L_init); QK-norm: 0.5, 0, 0.1, 0.4
    assert headline.value == pytest.approx((0.5 + 2 * 2.8) / 4 - (0.5 + 0.1 + 0.4) / 4, abs=0.01)
    assert headline.low is not None and headline.low > 0
    growth = next(m for m in analysis.more if m.name.startswith("attention-logit growth of plain"))
    assert growth.value == pytest.approx(1000, rel=0.05)
    assert verdict(analysis)[0] == "agree"
    assert {r["arm"] for r in analysis.tables["sensitivity"]} == {"plain", "qk_norm", "z_loss"}
    assert len(analysis.tables["logits"]) == 3 * 2 * len(lrs)
    assert (tmp_path / "stability.png").is_file()
