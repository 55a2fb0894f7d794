"""µP (model.parametrization: mup): SP unchanged, µP at the base width is SP exactly, and at
other widths the init, learning rates, output multiplier and attention scale follow m."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
import torch.nn.functional as F

from testbed import cli as testbed_cli
from testbed.config import config_hash, load_config
from testbed.data import loader as data_loader
from testbed.errors import ConfigError, TestbedError
from testbed.model.hf import check_exportable
from testbed.model.transformer import Transformer, attention_scale
from testbed.optim import build_optimizer, param_groups
from testbed.train import trainer as trainer_module
from testbed.train.mup import best_lrs, lr_shift, slope, slopes, train_steps
from testbed.train.trainer import train

TINY = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.vocab_size": 64}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(**kw):
    return load_config(None, {**TINY, **{f"model.{k}" if "." not in k else k: v for k, v in kw.items()}})


def mup(d_model: int, base: int, **kw):
    return config(d_model=d_model, parametrization="mup", mup_base_width=base, **kw)


def build(cfg, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg.model)


def tokens(n: int = 4, t: int = 16, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t + 1), generator=torch.Generator().manual_seed(1))


def adamw_losses(cfg, steps: int = 3) -> tuple[list[float], Transformer]:
    model = build(cfg)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = cfg.optim.lr * group.get("lr_scale", 1.0)
    idx, losses = tokens(), []
    for _ in range(steps):
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model


# ----------------------------------------------------------------------------- SP and the base width


def test_sp_is_the_default_and_unchanged():
    """The default config trains to the very losses it gave before µP existed (recorded from the
    previous code with this script: seed 0, tokens from seed 1, three AdamW steps)."""
    assert config().model.parametrization == "sp"
    losses, model = adamw_losses(config())
    assert losses == pytest.approx([4.152826309204102, 3.9734480381011963, 3.8349037170410156], rel=1e-6)
    # rel 1e-6, as the losses: float32 kernels differ in their last bits between CPUs (an
    # AVX512-BF16 AMD and an AVX512 Intel part differ by 3.6e-8 here), while any change to an init
    # or a group's LR moves this sum by far more.
    assert sum(p.double().sum().item() for p in model.parameters()) == pytest.approx(164.12345239076603, rel=1e-6)
    groups = param_groups(model, 0.1)
    assert [set(g) for g in groups] == [{"params", "weight_decay"}] * 2  # no lr_scale under SP
    assert model.output_mult is None and model.blocks[0].attn.scale is None


def test_mup_at_its_base_width_is_sp_exactly():
    sp, base = config(), mup(32, 32)
    sp_model, mup_model = build(sp), build(base)
    for (name, a), (_, b) in zip(sp_model.state_dict().items(), mup_model.state_dict().items()):
        assert torch.equal(a, b), name
    idx = tokens()
    assert torch.equal(sp_model(idx), mup_model(idx))
    assert attention_scale(base.model) == 1 / math.sqrt(16)
    sp_losses, sp_after = adamw_losses(sp)
    mup_losses, mup_after = adamw_losses(base)
    assert sp_losses == mup_losses
    for a, b in zip(sp_after.parameters(), mup_after.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- the four µP rules


def test_hidden_init_std_shrinks_by_sqrt_m_and_the_embedding_and_head_keep_it():
    model = build(mup(256, 16, n_heads=4, init_std=0.02))  # m = 16: hidden std 0.005
    hidden = torch.cat([p.flatten() for p in model.blocks.parameters() if p.dim() == 2])
    assert hidden.std().item() == pytest.approx(0.02 / 4, rel=0.02)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    # The scaled init's residual projections: init_std / sqrt(2 L) / sqrt(m).
    scaled = build(mup(256, 16, n_heads=4, init="scaled"))
    assert scaled.blocks[0].mlp.down.weight.std().item() == pytest.approx(0.02 / 2 / 4, rel=0.03)
    assert scaled.blocks[0].mlp.gate_up.weight.std().item() == pytest.approx(0.02 / 4, rel=0.03)


@pytest.mark.parametrize("tied", [False, True])
def test_param_groups_give_hidden_matrices_lr_over_m(tied):
    cfg = mup(128, 32, tie_embeddings=tied)  # m = 4
    model = build(cfg)
    groups = build_optimizer(model, cfg.optim, torch.device("cpu")).param_groups
    ids = [{id(p) for p in g["params"]} for g in groups]
    hidden = {id(p) for p in model.blocks.parameters() if p.dim() == 2}
    vector_like = {id(model.embed.weight), id(model.head.weight)}  # one id when tied
    gains = {id(p) for p in model.parameters() if p.dim() == 1}
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [(1.0, 0.1), (0.25, 0.1), (1.0, 0.0)]
    assert [g["lr"] for g in groups] == [3e-3, 3e-3 * 0.25, 3e-3]  # before the trainer's first step too
    assert ids == [vector_like, hidden, gains]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_attention_scale_is_one_over_d_head_across_widths():
    """SP scales q.k by 1/sqrt(d_head); µP by 1/d_head, equal to SP's at the base width."""
    base, wide = mup(32, 32), mup(128, 32)  # d_head 16 and 64
    assert attention_scale(config().model) is None
    assert attention_scale(wide.model) / attention_scale(base.model) == pytest.approx(16 / 64)
    assert attention_scale(wide.model) == pytest.approx(math.sqrt(16) / 64)
    # The attention sublayer against the formula written out.
    attn = build(wide).blocks[0].attn
    x = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(2))
    q, k, v = attn.qkv(x).split(128, dim=-1)
    q, k, v = (t.view(2, 8, 2, 64).transpose(1, 2) for t in (q, k, v))
    q, k = attn.position(q, k)
    scores = (q @ k.transpose(-1, -2)) * 4.0 / 64  # sqrt(base d_head 16) / d_head 64
    scores = scores.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 8, 128))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_widening_by_heads_keeps_the_scale_with_the_base_head_width():
    """Widened at a fixed head width (more heads, as the depth dial does), d_head does not grow:
    with mup_base_head_dim set to that width the scale is SP's 1/sqrt(d_head), while the default
    (width grown at a fixed head count) would shrink it by 1/sqrt(m)."""
    wide_by_heads = mup(128, 32, n_heads=8, mup_base_head_dim=16)  # d_head 16 at both widths
    assert attention_scale(wide_by_heads.model) == pytest.approx(1 / math.sqrt(16))
    assert attention_scale(mup(128, 32, n_heads=8).model) == pytest.approx(1 / math.sqrt(16 * 4))
    with pytest.raises(ConfigError, match="mup_base_head_dim"):
        mup(128, 32, mup_base_head_dim=0)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_are_divided_by_m_also_inside_the_fused_loss(tied):
    cfg = mup(128, 32, tie_embeddings=tied)
    model = build(cfg)
    idx = tokens()
    x = model.embed(idx[:, :-1])
    for block in model.blocks:
        x = block(x)
    expected = model.head(model.norm(x)) / 4
    torch.testing.assert_close(model(idx[:, :-1]), expected)
    loss = model(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(loss, F.cross_entropy(expected.flatten(0, 1), idx[:, 1:].flatten()))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"model.parametrization='mup' needs model.mup_base_width"):
        config(parametrization="mup")
    with pytest.raises(ConfigError, match=r"model.parametrization='mu' is not a valid choice; did you mean 'mup'"):
        config(parametrization="mu")
    with pytest.raises(ConfigError, match=r"model.mup_base_width=0 must be positive"):
        config(parametrization="mup", mup_base_width=0)
    assert config(mup_base_width=64).model.width_mult == 1.0  # ignored under sp


def test_sp_run_ids_are_those_of_configs_written_before_mup():
    tree = config().to_dict()
    before = dict(tree, model={k: v for k, v in tree["model"].items()
                               if k not in ("parametrization", "mup_base_width")})
    assert config_hash(tree) == config_hash(before)
    assert config_hash(mup(32, 32).to_dict()) != config_hash(tree)
    assert config_hash(mup(32, 32).to_dict()) != config_hash(mup(32, 16).to_dict())


def test_export_refuses_mup_away_from_the_base_width():
    check_exportable(mup(32, 32).model)
    with pytest.raises(TestbedError, match="width multiplier 4"):
        check_exportable(mup(128, 32).model)


# ----------------------------------------------------------------------------- trainer and checks


RUN = {"name": "mup", "model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
                                "parametrization": "mup", "mup_base_width": 16},
       "data": {"seq_len": 32, "val_sequences": 4}, "schedule": {"name": "cosine", "warmup_steps": 2},
       "train": {"steps": 8, "global_batch_tokens": 128, "eval_every": 4, "log_every": 1, "device": "cpu"},
       "checkpoint": {"rolling_every": 2}, "logging": {"wandb": False, "progress": False}}


def train_losses(run_dir) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in lines if "train_loss" in r]


def test_trainer_keeps_the_lr_ratio_through_the_schedule_and_resumes_exactly(tmp_path, monkeypatch):
    optimizers = []

    def keep(model, cfg, device):
        optimizers.append(build_optimizer(model, cfg, device))
        return optimizers[-1]

    monkeypatch.setattr(trainer_module, "build_optimizer", keep)
    cfg = load_config(RUN)
    train(cfg, tmp_path / "ref")
    last_lr = cfg.schedule.lr(7, 8, cfg.optim.lr)
    assert [(g["lr_scale"], g["lr"]) for g in optimizers[0].param_groups] == \
        [(1.0, last_lr), (0.25, last_lr * 0.25), (1.0, last_lr)]

    # Preempted after step 3 (a real SIGUSR1), then resumed: the very same losses.
    original = data_loader.BatchPlan.batch_tokens

    def batch_tokens(self, step, rank=0, world=1):
        if step == 2:
            signal.raise_signal(signal.SIGUSR1)
        return original(self, step, rank, world)

    monkeypatch.setattr(data_loader.BatchPlan, "batch_tokens", batch_tokens)
    assert train(cfg, tmp_path / "cut")["exit_code"] == 75
    monkeypatch.setattr(data_loader.BatchPlan, "batch_tokens", original)
    assert train(cfg, tmp_path / "cut", resume=True)["exit_code"] == 0
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "ref")
    assert [g["lr_scale"] for g in optimizers[-1].param_groups] == [1.0, 0.25, 1.0]


def test_coordinate_check_is_flat_under_mup_and_grows_under_sp(tmp_path, capsys):
    """`testbed mup check`: after three AdamW steps at lr 1e-2, the blocks' outputs and the
    logits grow with width under SP (slope of log scale against log width > 0.5) and stay
    near flat under µP; the embedding is flat under both."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model: {n_layers: 2, n_heads: 2, max_seq_len: 32}\ndata: {seq_len: 32}\n"
                   "train: {global_batch_tokens: 128}\noptim: {lr: 1.0e-2}\n")
    assert testbed_cli.main(["mup", "check", str(cfg), "--widths", "32,64,128", "--steps", "3",
                             "--out", str(tmp_path / "out")]) == 0
    assert "slope" in capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "coord_check.json").read_text())
    assert (tmp_path / "out" / "coord_check.png").stat().st_size > 0
    fitted = slopes(rows)
    for layer in ("block0", "block1", "logits"):
        assert fitted["sp", layer] > 0.5, (layer, fitted)
        assert fitted["sp", layer] - fitted["mup", layer] > 0.6, (layer, fitted)
    assert abs(fitted["mup", "block0"]) < 0.3 and abs(fitted["mup", "block1"]) < 0.4, fitted
    # µP's logits = (init part, falling like 1/sqrt(m)) + (update part, flat): a mild decline.
    assert -0.5 < fitted["mup", "logits"] < 0.1, fitted
    assert abs(fitted["sp", "embedding"]) < 0.1 and abs(fitted["mup", "embedding"]) < 0.1


def test_mup_check_refuses_bad_widths(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model: {n_heads: 2}\n")
    assert testbed_cli.main(["mup", "check", str(cfg), "--widths", "32,x"]) == 2
    assert "--widths='32,x' must be comma-separated whole numbers" in capsys.readouterr().err
    assert testbed_cli.main(["mup", "check", str(cfg), "--widths", "32,33"]) == 2
    assert "divisible by model.n_heads=2" in capsys.readouterr().err


def test_train_steps_matches_the_trainer_loss(tmp_path):
    """The checks' small loop takes the trainer's steps: same first losses."""
    cfg = load_config(RUN, {"checkpoint.rolling_every": None, "train.steps": 3})
    losses = train_steps(cfg, 3)
    train(cfg, tmp_path / "run")
    assert [x for _, x in train_losses(tmp_path / "run")] == pytest.approx(losses, rel=1e-6)


# ----------------------------------------------------------------------------- the transfer grid


def test_slope_and_best_lr_logic():
    assert slope([32, 64, 128], [1.0, 2.0, 4.0]) == pytest.approx(1.0)
    assert slope([32, 64, 128], [3.0, 3.0, 3.0]) == pytest.approx(0.0, abs=1e-12)
    lrs = [1e-3, 3e-3, 1e-2, 3e-2]
    loss = {("sp", 32): [3.0, 2.5, 2.4, 2.6], ("sp", 256): [2.2, 2.1, 2.3, math.inf],
            ("mup", 32): [3.0, 2.5, 2.4, 2.6], ("mup", 256): [2.5, 2.1, 2.0, 2.2]}
    rows = [{"parametrization": k, "width": w, "lr": lr, "loss": x}
            for (k, w), xs in loss.items() for lr, x in zip(lrs, xs)]
    assert best_lrs(rows) == {("sp", 32): 1e-2, ("sp", 256): 3e-3, ("mup", 32): 1e-2, ("mup", 256): 1e-2}
    assert lr_shift(rows, "sp", lrs) == -1 and lr_shift(rows, "mup", lrs) == 0
