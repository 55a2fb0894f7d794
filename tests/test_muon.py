"""`optim.name=muon`: which parameters Muon and AdamW update, one step against an independent
computation, training and exact resume through the trainer, µP groups, options, FLOPs overhead."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from testbed.config import load_config
from testbed.errors import ConfigError
from testbed.model.transformer import Transformer
from testbed.optim import build_optimizer, muon_flops_per_step, muon_overhead, newton_schulz_flops
from testbed.rundir import RunDir
from testbed.train import checkpoint as ckpt
from testbed.train.trainer import train

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=64"]
CPU = torch.device("cpu")


def names_by_group(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in optimizer.param_groups]


@pytest.mark.parametrize("tied", [False, True])
def test_blocks_matrices_under_muon_the_rest_under_adamw(tied):
    config = load_config(None, ["optim.name=muon", *TINY, f"model.tie_embeddings={str(tied).lower()}"])
    torch.manual_seed(0)
    model = Transformer(config.model)
    optimizer = build_optimizer(model, config.optim, CPU)
    groups = names_by_group(model, optimizer)
    matrices = {f"blocks.{i}.{m}.weight" for i in range(2)
                for m in ("attn.qkv", "attn.out", "mlp.gate_up", "mlp.down")}
    io = {"embed.weight"} if tied else {"embed.weight", "head.weight"}  # a tied head is the embedding
    norms = {"norm.weight"} | {f"blocks.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "mlp_norm")}
    assert groups == [matrices, io, norms]
    muon_group, io_group, norm_group = optimizer.param_groups
    assert "ns_steps" in muon_group and "betas" not in muon_group  # a Muon group
    assert io_group["betas"] == (0.9, 0.95) and io_group["eps"] == 1e-8  # AdamW with the config's
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.1, 0.0]
    assert muon_group["adjust_lr_fn"] == "match_rms_adamw" and muon_group["momentum"] == 0.95
    assert muon_group["nesterov"] is True and muon_group["ns_steps"] == 5
    assert all(g["lr"] == config.optim.lr and "lr_scale" not in g for g in optimizer.param_groups)  # SP


def test_state_round_trips_through_the_checkpoint_format():
    """The checkpoint's own flatten/JSON/unflatten, loaded into a fresh optimiser: the same
    state, groups shared with the inner Muon and AdamW again, the config's Muon settings kept."""
    config = load_config(None, ["optim.name=muon", *TINY])
    torch.manual_seed(0)
    model = Transformer(config.model)
    optimizer = build_optimizer(model, config.optim, CPU)
    x = torch.randint(0, 64, (2, 9))
    model(x[:, :-1], x[:, 1:]).backward()
    optimizer.step()
    tensors, meta = ckpt.flatten_optimizer(optimizer.state_dict())
    fresh = build_optimizer(model, config.optim, CPU)
    fresh.load_state_dict(ckpt.unflatten_optimizer(tensors, json.loads(json.dumps(meta))))
    a, b = optimizer.state_dict(), fresh.state_dict()
    as_json = json.loads(json.dumps(a["param_groups"]))  # AdamW's betas: a list (the trainer resets them)
    assert as_json == json.loads(json.dumps(b["param_groups"]))
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for k in a["state"][i])
    inner = fresh.muon, fresh.adamw
    assert inner[0].param_groups[0] is fresh.param_groups[0] and inner[1].param_groups[-1] is fresh.param_groups[-1]
    assert inner[0].state is fresh.state and inner[1].state is fresh.state
    assert fresh.param_groups[0]["ns_coefficients"] == (3.4445, -4.7750, 2.0315)  # a tuple again


class Toy(nn.Module):
    """Two matrices, one wide and one tall, and a gain (AdamW's)."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(64, 16, bias=False)  # weight 16 x 64
        self.tall = nn.Linear(16, 64, bias=False)  # weight 64 x 16
        self.gain = nn.Parameter(torch.ones(16))


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's quintic iteration, written with plain ops: X kept in bf16 as torch keeps
    it, each product and sum done in fp32 and rounded to bf16 once (as torch's addmm does on CPU;
    bf16 ops one by one round more often and drift by a few per cent over five iterations)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    flip = x.shape[0] > x.shape[1]
    if flip:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        xf = x.float()
        gram = (xf @ xf.T).bfloat16().float()  # A = X X^T
        poly = (b * gram + c * (gram @ gram)).bfloat16().float()  # B = b A + c A^2
        x = (a * xf + poly @ xf).bfloat16()  # X = a X + B X
    return (x.T if flip else x).float()


@pytest.mark.parametrize("rule", ["match_rms_adamw", "original"])
def test_two_steps_equal_an_independent_computation(rule):
    lr, wd, mu = 0.05, 0.5, 0.9
    config = load_config(None, ["optim.name=muon", f"optim.lr={lr}", f"optim.weight_decay={wd}",
                                f"optim.options.momentum={mu}", f"optim.options.adjust_lr={rule}"])
    torch.manual_seed(0)
    toy = Toy()
    with torch.no_grad():
        for p in (toy.wide.weight, toy.tall.weight):
            p.normal_()  # entries of size 1: the decay (lr x wd x W) is far above bf16's noise
    optimizer = build_optimizer(toy, config.optim, CPU)
    assert names_by_group(toy, optimizer) == [{"wide.weight", "tall.weight"}, set(), {"gain"}]
    grads = [{n: torch.randn_like(p) for n, p in toy.named_parameters()} for _ in range(2)]
    expected = {n: p.detach().clone() for n, p in toy.named_parameters()}
    buf = {n: torch.zeros_like(p) for n, p in expected.items()}
    # Step 1 agrees to fp32 rounding. Step 2's Nesterov input differs from torch's lerp in the last
    # fp32 bit; where that flips a bf16 rounding, the quintic (slope a = 3.4 at zero, five times)
    # spreads it, so step 2 is held to 2e-3 at most and 2e-4 on average. For scale: an entry of the
    # update is about 0.1-0.4 x lr x scale (5e-3 to 3e-2 here), the two rules' scales differ by
    # 1.6 vs 1 (wide) and 1.6 vs 2 (tall), and the decay moves an entry by lr x wd x |W| ~ 0.025.
    for step, (step_grads, max_error, mean_error) in enumerate(zip(grads, (1e-6, 2e-3), (1e-6, 2e-4))):
        for n, p in toy.named_parameters():
            p.grad = step_grads[n].clone()
        optimizer.step()
        for n in ("wide.weight", "tall.weight"):
            g, w = step_grads[n], expected[n]
            buf[n] = mu * buf[n] + (1 - mu) * g  # torch keeps the momentum as an average
            nesterov = (1 - mu) * g + mu * buf[n]
            rows, cols = w.shape
            scale = 0.2 * max(rows, cols) ** 0.5 if rule == "match_rms_adamw" else max(1.0, rows / cols) ** 0.5
            expected[n] = w * (1 - lr * wd) - lr * scale * newton_schulz(nesterov)  # decoupled decay
            error = (expected[n] - dict(toy.named_parameters())[n].detach()).abs()
            assert error.max() < max_error and error.mean() < mean_error, (step, n, error.max(), error.mean())


def test_flops_count_by_hand_for_a_two_matrix_toy():
    def mm(p: int, q: int, r: int) -> int:  # (p x q) @ (q x r)
        return 2 * p * q * r

    # Both matrices are oriented 16 x 64 (the tall one transposed): per iteration X X^T,
    # A A, and B X.
    per_iteration = mm(16, 64, 16) + mm(16, 16, 16) + mm(16, 16, 64)
    assert newton_schulz_flops([(16, 64), (64, 16)], ns_steps=5) == 2 * 5 * per_iteration == 737_280
    assert newton_schulz_flops([(16, 64)], ns_steps=3) == 3 * per_iteration


def test_flops_of_a_transformer_are_its_blocks_matrices():
    config = load_config(None, TINY)  # d 32, 2 layers, d_ff 96, 2 heads of 16
    d, ff = 32, config.model.d_ff
    shapes = [(3 * d, d), (d, d), (2 * ff, d), (d, ff)] * 2  # qkv, out, gate_up, down; no embedding or head
    by_hand = sum(5 * (2 * min(s) ** 2 * max(s) * 2 + 2 * min(s) ** 3) for s in shapes)
    assert muon_flops_per_step(config.model) == by_hand
    from testbed.model.counting import flops_per_token

    ratio = muon_overhead(config.model, 32, 256)
    assert ratio == pytest.approx(by_hand / (flops_per_token(config.model, 32) * 256))


def test_mup_matrices_keep_their_lr_scale_under_muon():
    config = load_config(None, ["optim.name=muon", *TINY, "model.parametrization=mup", "model.mup_base_width=8"])
    model = Transformer(config.model)
    optimizer = build_optimizer(model, config.optim, CPU)
    muon_group, io_group, norm_group = optimizer.param_groups
    assert muon_group["lr_scale"] == 0.25 and muon_group["lr"] == config.optim.lr * 0.25
    assert {"embed.weight", "head.weight"} == names_by_group(model, optimizer)[1]
    assert all(g.get("lr_scale", 1.0) == 1.0 and g["lr"] == config.optim.lr for g in (io_group, norm_group))
    for group in optimizer.param_groups:  # the trainer's contract (testbed/train/trainer.py)
        group["lr"] = 1e-3 * group["lr_scale"] if "lr_scale" in group else 1e-3
    assert optimizer.muon.param_groups[0]["lr"] == 1e-3 * 0.25


@pytest.mark.parametrize("override, message", [
    ("momentum=1.0", r"^optim\.options\.momentum is 1\.0; set it in \[0, 1\)"),
    ("ns_steps=0", r"^optim\.options\.ns_steps is 0; set it to a whole number"),
    ("adjust_lr=rms", r"^optim\.options\.adjust_lr is 'rms'; choose match_rms_adamw"),
    ("nesteroff=true", r"^optim\.options\.nesteroff is True but optimiser 'muon' has no nesteroff; did you mean 'nesterov'"),
])
def test_bad_options_are_one_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["optim.name=muon", f"optim.options.{override}"])


# ----------------------------------------------------------------------------- through the trainer

STEPS = 24
BASE = {
    "name": "muon-test",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
    "data": {"source": "synthetic", "seq_len": 32, "val_sequences": 8},
    "optim": {"name": "muon", "lr": 1e-2},
    "schedule": {"name": "cosine", "warmup_steps": 2},
    "train": {"steps": STEPS, "global_batch_tokens": 256, "eval_every": 12, "log_every": 1, "device": "cpu"},
    "checkpoint": {"every": 12},
    "logging": {"wandb": False, "progress": False},
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("muon")
    config_path = root / "muon.yaml"
    config_path.write_text(yaml.safe_dump(BASE))
    assert train(load_config(config_path), root / "reference")["exit_code"] == 0
    return config_path, root / "reference"


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["train_loss"]) for m in RunDir(run_dir).metrics() if "train_loss" in m]


def test_training_with_muon_lowers_the_loss():
    """Thirty steps on one batch of a tiny model, as the trainer steps (lr x lr_scale, clipping):
    the loss falls well below its start (ln 64 = 4.16), under SP and µP."""
    for extra in ([], ["model.parametrization=mup", "model.mup_base_width=16"]):
        config = load_config(None, ["optim.name=muon", "optim.lr=1e-2", *TINY, *extra])
        torch.manual_seed(0)
        model = Transformer(config.model)
        optimizer = build_optimizer(model, config.optim, CPU)
        batch = torch.randint(0, 64, (8, 33), generator=torch.Generator().manual_seed(1))
        trace = []
        for _ in range(30):
            for group in optimizer.param_groups:
                group["lr"] = config.optim.lr * group.get("lr_scale", 1.0)
            loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            trace.append(loss.item())
        assert trace[-1] < trace[0] - 1.0, (extra, trace)


def test_resume_with_muon_is_exact(reference):
    """Cut back to the step-12 checkpoint and resumed: the same losses and final weights, bit for bit."""
    config_path, ref = reference
    run_dir = ref.parent / "cut"
    shutil.copytree(ref, run_dir)
    for folder in ckpt.list_checkpoints(run_dir):
        if ckpt.step_of(folder) > 12:
            shutil.rmtree(folder)
    RunDir(run_dir).write_status("running", step=17, message="killed")
    assert train(load_config(config_path), run_dir)["exit_code"] == 0
    assert any("resume from" in line for line in (run_dir / "train.log").read_text().splitlines())
    assert losses(run_dir) == losses(ref)
    final = f"step_{STEPS:08d}"
    a = load_file(str(ref / "checkpoints" / final / "model.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / final / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
