"""Stability signals: z-loss, per-layer gradient and update norms, loss spikes (in metrics and in
`testbed sweep status`), and per-branch optimiser overrides."""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from testbed.config import load_config
from testbed.data import loader as data_loader
from testbed.errors import ConfigError, TestbedError
from testbed.model.loss import linear_cross_entropy, linear_cross_entropy_terms
from testbed.train import checkpoint as ckpt
from testbed.train.branch import branch, optim_overrides
from testbed.train.trainer import train

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "data.seq_len=32", "train.global_batch_tokens=512", "train.log_every=1", "train.eval_every=100",
        "logging.wandb=false", "logging.progress=false", "data.val_sequences=8"]
VOLATILE = ("tokens_per_s", "mfu", "peak_mem_gb")


def cfg(*extra):
    return load_config(None, TINY + list(extra))


def lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_lines(run_dir):
    return [{k: v for k, v in x.items() if k not in VOLATILE} for x in lines(run_dir) if "train_loss" in x]


# ----------------------------------------------------------------------------- z-loss


def plain_terms(h, w, t, z):
    logits = (h @ w.t()).float().reshape(-1, w.shape[0])
    ce = F.cross_entropy(logits, t.reshape(-1))
    zt = torch.logsumexp(logits, dim=-1).square().mean()
    return ce + z * zt, ce, zt


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_z_loss_and_its_gradients_match_autograd(chunk):
    torch.manual_seed(0)
    h = torch.randn(3, 20, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (3, 20))
    objective, ce, zt = linear_cross_entropy_terms(h, w, t, 0.3, chunk=chunk)
    ours = torch.autograd.grad(2.0 * objective, (h, w))
    ref, ref_ce, ref_z = plain_terms(h, w, t, 0.3)
    theirs = torch.autograd.grad(2.0 * ref, (h, w))
    assert objective.item() == pytest.approx(ref.item(), rel=1e-6)
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-6) and zt.item() == pytest.approx(ref_z.item(), rel=1e-6)
    assert not ce.requires_grad and not zt.requires_grad
    assert all(torch.allclose(a, b.to(a.dtype), atol=1e-6) for a, b in zip(ours, theirs))
    # Sum reduction and the no-grad path (validation) agree.
    with torch.no_grad():
        total, ce_sum, z_sum = linear_cross_entropy_terms(h, w, t, 0.3, reduction="sum", chunk=chunk)
    assert total.item() == pytest.approx(60 * ref.item(), rel=1e-6)
    assert z_sum.item() == pytest.approx(60 * ref_z.item(), rel=1e-6)


def test_z_loss_on_the_compiled_elementwise_path():
    from testbed.model import loss as loss_module

    torch.manual_seed(4)
    h = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 30, (40,))
    eager = linear_cross_entropy_terms(h, w, t, 0.05, chunk=9)
    ge = torch.autograd.grad(eager[0], (h, w))
    original = loss_module._compiled_softmax_grad
    loss_module._compiled_softmax_grad = loss_module.softmax_grad
    try:
        fused = linear_cross_entropy_terms(h, w, t, 0.05, chunk=9, compiled=True)
        gf = torch.autograd.grad(fused[0], (h, w))
    finally:
        loss_module._compiled_softmax_grad = original
    assert [x.item() for x in fused] == pytest.approx([x.item() for x in eager], rel=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(ge, gf))


def test_zero_z_loss_is_the_plain_cross_entropy():
    torch.manual_seed(1)
    h, w, t = torch.randn(40, 8, requires_grad=True), torch.randn(30, 8), torch.randint(0, 30, (40,))
    objective, ce, zt = linear_cross_entropy_terms(h, w, t, 0.0, chunk=9)
    assert objective.item() == ce.item() == linear_cross_entropy(h, w, t, chunk=9).item()
    assert zt.item() == 0.0


def test_z_loss_config_is_range_checked():
    assert cfg().optim.z_loss == 0.0
    with pytest.raises(ConfigError, match="optim.z_loss"):
        cfg("optim.z_loss=-1e-4")
    with pytest.raises(ConfigError, match="train.spike_nats"):
        cfg("train.spike_nats=0")


# ----------------------------------------------------------------------------- train lines


def test_train_lines_carry_z_loss_norms_and_spike_count(tmp_path):
    train(cfg("train.steps=4", "train.log_every=2", "optim.z_loss=1e-2"), tmp_path / "z")
    rows = train_lines(tmp_path / "z")
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["z_loss"] > 0 and r["spikes"] == 0
        assert len(r["grad_norm_layers"]) == 2 and len(r["update_norm_layers"]) == 2
        # The blocks' gradients are part of the global (pre-clipping) norm.
        assert math.hypot(*r["grad_norm_layers"]) <= r["grad_norm"] * (1 + 1e-3)
        assert r["update_norm"] >= math.hypot(*r["update_norm_layers"]) * (1 - 1e-3) > 0
    train(cfg("train.steps=4", "train.log_every=2"), tmp_path / "plain")
    plain = train_lines(tmp_path / "plain")
    assert "z_loss" not in plain[0]
    assert plain[-1]["train_loss"] != rows[-1]["train_loss"]  # the z-loss changed the training


def test_update_norm_is_the_parameter_change(tmp_path):
    """One step, one line: update_norm is the norm of (weights after - weights before)."""
    config = cfg("train.steps=1", "checkpoint.final=true")
    from testbed.model.transformer import Transformer
    from testbed.plan import resolved_model

    torch.manual_seed(config.train.seed)
    start = Transformer(resolved_model(config)).state_dict()
    train(config, tmp_path / "one")
    end = ckpt.load(ckpt.checkpoint_at(tmp_path / "one", 1))["model"]
    change = math.sqrt(sum(float((end[k].float() - start[k].float()).square().sum()) for k in end))
    assert train_lines(tmp_path / "one")[0]["update_norm"] == pytest.approx(change, rel=1e-3)


# ----------------------------------------------------------------------------- spikes


def spike_at(monkeypatch, *at_steps: int):
    """Every batch is one repeated token (quickly learnt) but those of steps `at_steps` (1-based),
    which are the language's: a loss spike."""
    original = data_loader.BatchPlan.batch_tokens

    def batch_tokens(self, step, rank=0, world=1):
        tokens = original(self, step, rank, world)
        return tokens if step + 1 in at_steps else np.zeros_like(tokens)

    monkeypatch.setattr(data_loader.BatchPlan, "batch_tokens", batch_tokens)


def test_a_loss_spike_is_counted_and_sized(tmp_path, monkeypatch):
    spike_at(monkeypatch, 9)
    train(cfg("train.steps=10", "train.spike_nats=0.2", "schedule.warmup_steps=0"), tmp_path / "s")
    rows = train_lines(tmp_path / "s")
    spiked = [r for r in rows if "spike" in r]
    assert [r["step"] for r in spiked] == [9] and spiked[0]["spike"] > 0.2
    assert [r["spikes"] for r in rows] == [0] * 8 + [1, 1]


def test_resume_keeps_the_spike_baseline_and_z_loss_window(tmp_path, monkeypatch):
    """Preempted mid-window before the spike and resumed: every train line (z-loss, spike size,
    norms) equals the uninterrupted run's."""
    spike_at(monkeypatch, 9, 10)
    extra = ("train.steps=10", "train.log_every=2", "train.spike_nats=0.1", "optim.z_loss=1e-3",
             "schedule.warmup_steps=0")
    train(cfg(*extra), tmp_path / "ref")
    reference = train_lines(tmp_path / "ref")
    assert any("spike" in r for r in reference)

    patched = data_loader.BatchPlan.batch_tokens

    def preempting(self, step, rank=0, world=1):
        if step == 4:  # the step that completes as 5, inside the window 5..6
            signal.raise_signal(signal.SIGUSR1)
        return patched(self, step, rank, world)

    monkeypatch.setattr(data_loader.BatchPlan, "batch_tokens", preempting)
    assert train(cfg(*extra), tmp_path / "cut")["exit_code"] == 75
    monkeypatch.setattr(data_loader.BatchPlan, "batch_tokens", patched)
    assert train(cfg(*extra), tmp_path / "cut", resume=True)["exit_code"] == 0
    assert train_lines(tmp_path / "cut") == reference


def test_sweep_status_flags_runs_with_spikes(tmp_path):
    from testbed.sweep.registry import Registry
    from testbed.sweep.spec import load_sweep
    from testbed.sweep.status import collect, render_status

    base = {"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
            "data": {"seq_len": 32}, "train": {"steps": 4, "global_batch_tokens": 256},
            "logging": {"wandb": False, "progress": False}}
    registry = Registry(tmp_path / "sweep")
    ids = registry.add_runs(load_sweep({"name": "s", "base": base, "grid": {"train.seed": [0, 1, 2]}}))
    for run_id, spikes in zip(ids, (0, 2, None)):
        folder = registry.run_dir(run_id)
        folder.mkdir(parents=True, exist_ok=True)
        line = {"step": 4, "train_loss": 3.0, **({"spikes": spikes} if spikes is not None else {})}
        (folder / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    report = collect(registry)
    assert [r["spikes"] for r in report["runs"]] == [0, 2, None]
    text = render_status(report)
    assert "spikes" in text.splitlines()[0]
    assert f"UNSTABLE (training-loss spikes; see `spike` in their metrics.jsonl): {ids[1]} (2)" in text
    assert ids[0] not in text.split("UNSTABLE")[1]


# ----------------------------------------------------------------------------- branch overrides


def test_branch_overrides_betas_and_weight_decay_and_keeps_the_optimiser_state(tmp_path, monkeypatch):
    parent = tmp_path / "parent"
    train(cfg("train.steps=8", "checkpoint.every=4", "schedule.name=wsd", "schedule.warmup_steps=1",
              "schedule.decay_fraction=0.2"), parent)
    seen = {}
    from testbed.train import trainer as trainer_module

    original = trainer_module.Trainer.parallelize

    def spy(self):
        original(self)
        seen["groups"] = [{k: g[k] for k in ("betas", "weight_decay")} for g in self.optimizer.param_groups]
        seen["steps"] = {float(s["step"]) for s in self.optimizer.state.values()}

    monkeypatch.setattr(trainer_module.Trainer, "parallelize", spy)
    overrides = optim_overrides(beta2=0.99, weight_decay=0.0)
    summary = branch(parent, 4, 0.5, optim=overrides)
    assert summary["exit_code"] == 0
    assert seen["groups"] == [{"betas": (0.9, 0.99), "weight_decay": 0.0}] * 2
    assert seen["steps"] == {4.0}  # the parent's moments and step counts were loaded
    folder = parent / "branches" / "step4_decay0.5_1-sqrt_beta20.99_weight_decay0"
    run = json.loads((folder / "run.json").read_text())
    assert run["config"]["optim"]["betas"] == [0.9, 0.99] and run["config"]["optim"]["weight_decay"] == 0.0
    assert run["labels"]["branch_optim"] == "beta20.99_weight_decay0"
    state = ckpt.read_state(ckpt.checkpoint_at(folder, 8))
    assert state["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.99]
    # The parent is untouched, and a plain branch next to it keeps the parent's values.
    assert json.loads((parent / "run.json").read_text())["config"]["optim"]["betas"] == [0.9, 0.95]
    branch(parent, 4, 0.5)
    assert seen["groups"][0]["betas"] == (0.9, 0.95)


def test_branch_optim_flags_are_checked():
    assert optim_overrides(None, None, ["optim.betas=[0.9,0.98]", "eps=1.0e-9"]) == \
        {"betas": [0.9, 0.98], "eps": 1e-9}
    with pytest.raises(TestbedError, match="keeps the parent's optimiser"):
        optim_overrides(pairs=["name=sgd"])


def test_branch_cli_passes_the_overrides(tmp_path):
    from testbed.cli import build_parser

    args = build_parser().parse_args(["branch", str(tmp_path), "--step", "4", "--decay", "0.5",
                                      "--beta2", "0.99", "--optim", "grad_clip=0.5"])
    assert optim_overrides(args.beta2, args.weight_decay, args.optim) == {"grad_clip": 0.5, "beta2": 0.99}
