"""IsoFLOP runs: a compute budget (train.flops) as a run length, the depth dial, and the example
IsoFLOP sweep, checked against FLOPs computed here independently of testbed's counting code."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.config import from_dict, load_config, saved_config
from testbed.errors import ConfigError
from testbed.plan import describe
from testbed.sweep.spec import load_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model": {"max_seq_len": 16}, "data": {"seq_len": 16, "synthetic": {"vocab_size": 32}},
        "train": {"global_batch_tokens": 1024}}


def by_hand_flops_per_token(d: int, layers: int, vocab: int, seq_len: int) -> int:
    """PaLM's count for the built-in model (untied SwiGLU, full multi-head attention), written
    out here rather than taken from testbed.model.counting."""
    d_ff = 32 * -(-round(8 / 3 * d) // 32)
    per_layer = 4 * d * d + 3 * d * d_ff  # q, k, v, o and the three SwiGLU matrices
    return 6 * (layers * per_layer + vocab * d) + 12 * layers * seq_len * d


def by_hand_steps(budget: int, fpt: int, batch: int) -> int:
    """Nearest whole step, halves up, in integer arithmetic."""
    return max(1, (2 * budget + fpt * batch) // (2 * fpt * batch))


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("budget", [10**11, 3 * 10**11, 7 * 10**9])
def test_a_budget_gives_the_nearest_whole_step_of_flops(depth, budget):
    c = load_config(TINY, {"model.depth": depth, "train.flops": float(budget)})
    q = describe(c)
    fpt = by_hand_flops_per_token(32 * depth, depth, 32, 16)
    assert q["flops_per_token"] == fpt
    assert q["planned_steps"] == by_hand_steps(budget, fpt, 1024)
    assert q["planned_flops"] == q["planned_steps"] * 1024 * fpt
    assert abs(q["planned_flops"] - budget) <= fpt * 1024 / 2


def test_budget_rounding_rule_at_the_edges():
    c = load_config(TINY, {"model.depth": 2, "train.steps": 1})
    step_flops = describe(c)["planned_flops"]  # the FLOPs of exactly one step
    for budget, steps in ((7 * step_flops, 7), (7.5 * step_flops, 8), (7.49 * step_flops, 7),
                          (0.1 * step_flops, 1)):
        c = load_config(TINY, {"model.depth": 2, "train.flops": budget})
        assert describe(c)["planned_steps"] == steps, budget


def test_flops_is_one_of_the_run_lengths():
    with pytest.raises(ConfigError, match="train.tokens and train.flops both set"):
        load_config({"train": {"tokens": 10, "flops": 1e12}})
    with pytest.raises(ConfigError, match=r"train.flops=-1.0 must be positive"):
        load_config(None, ["train.flops=-1"])
    # A budget on the command line replaces the file's run length, whichever form it took.
    c = load_config({**TINY, "train": {"global_batch_tokens": 1024, "tokens": 10**6}}, ["train.flops=1e12"])
    assert c.train.flops == 1e12 and c.train.tokens is None


def test_the_depth_dial_derives_width_and_heads():
    c = load_config(None, {"model.depth": 5})
    assert (c.model.n_layers, c.model.d_model, c.model.n_heads) == (5, 160, 5)
    c = load_config(None, {"model.depth": 4, "model.depth_aspect": 64, "model.depth_head_dim": 16})
    assert (c.model.n_layers, c.model.d_model, c.model.n_heads) == (4, 256, 16)
    # A saved config holds both the dial and the shape it set: it loads again unchanged.
    assert saved_config(c.to_dict()) == c
    with pytest.raises(ConfigError, match="model.d_model=64 disagrees with model.depth=4"):
        load_config(None, {"model.depth": 4, "model.d_model": 64})
    with pytest.raises(ConfigError, match="model.depth=4 and model.preset='1m' both set"):
        load_config(None, {"model.depth": 4, "model.preset": "1m"})
    with pytest.raises(ConfigError, match="not a multiple of model.depth_head_dim=24"):
        load_config(None, {"model.depth": 1, "model.depth_head_dim": 24})
    with pytest.raises(ConfigError, match="model.depth=0 must be positive"):
        from_dict({"model": {"depth": 0}})


def test_a_budget_by_model_size_sweep_is_two_lines():
    s = load_sweep({"name": "iso", "base": TINY,
                    "grid": {"train.flops": [1e11, 3e11], "model.d_model": [32, 64]}})
    assert len(s.runs) == 4
    for run in s.runs:
        q = run.quantities
        assert abs(q["planned_flops"] - run.config.train.flops) <= q["flops_per_token"] * 1024 / 2


def test_the_example_isoflop_sweep_plans_every_run_within_half_a_step_of_its_budget():
    s = load_sweep(ROOT / "configs" / "sweeps" / "isoflop.yaml")
    budgets = {run.config.train.flops for run in s.runs}
    depths = {run.config.model.depth for run in s.runs}
    assert len(s.runs) == len(budgets) * len(depths) >= 6
    for run in s.runs:
        m, q = run.config.model, run.quantities
        assert (m.n_layers, m.d_model, m.n_heads) == (m.depth, m.depth_aspect * m.depth, m.depth)
        fpt = by_hand_flops_per_token(m.d_model, m.n_layers, 32, 16)
        budget = int(run.config.train.flops)
        assert q["planned_steps"] == by_hand_steps(budget, fpt, 1024)
        assert q["planned_flops"] == q["planned_steps"] * 1024 * fpt
        assert abs(q["planned_flops"] - budget) <= fpt * 1024 / 2
        assert abs(q["planned_flops"] / budget - 1) < 0.05  # tiny runs still land near C


def test_run_ids_of_sweeps_without_the_new_keys_are_unchanged():
    """Pinned ids: keys that change no number, and later keys at their defaults, do not count."""
    base = {"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
            "data": {"seq_len": 32}, "train": {"global_batch_tokens": 256, "tokens": 25600},
            "logging": {"wandb": False, "progress": False}}
    s = load_sweep({"name": "t", "base": base, "grid": {"model.d_model": [32, 64]}})
    assert [r.run_id for r in s.runs] == ["d_model-32-6f8115d48f", "d_model-64-df2949570f"]
    watched = load_sweep({"name": "t", "base": {**base, "train": {**base["train"], "spike_nats": 1.0,
                                                                 "divergence_nats": 5.0}},
                          "grid": {"model.d_model": [32, 64]}})
    assert [r.run_id for r in watched.runs] == [r.run_id for r in s.runs]


EVERY_SECTION = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32, "n_kv_heads": 1, "qk_norm": True,
              "tie_embeddings": True, "norm_eps": 1e-6},
    "data": {"seq_len": 32, "seed": 3, "val_sequences": 16},
    "optim": {"lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.05},
    "schedule": {"name": "wsd", "warmup_steps": 5, "decay_fraction": 0.3, "decay_shape": "linear"},
    "train": {"global_batch_tokens": 256, "tokens": 25600, "seed": 2, "eval_every": 50},
    "checkpoint": {"every": 20, "log_spaced": 3, "at_tokens": [5120]},
    "logging": {"wandb": False, "progress": False}}


def test_run_ids_of_configs_setting_every_section_are_unchanged():
    """Pinned ids (hashed before fields declared their hashing in the section dataclasses): every
    section set; the later fields (hash_at_default False) at their defaults, set, and the power
    schedule with a compute budget."""
    from testbed.config import run_id

    def ids(base):
        return [r.run_id for r in load_sweep({"name": "t", "base": base, "grid": {"model.d_model": [32, 64]}}).runs]

    assert ids(EVERY_SECTION) == ["d_model-32-e84dad3d44", "d_model-64-0d28f7ce30"]
    later = {**EVERY_SECTION, "optim": {**EVERY_SECTION["optim"], "z_loss": 1e-4},
             "model": {**EVERY_SECTION["model"], "parametrization": "mup", "mup_base_width": 32, "mup_base_head_dim": 16},
             "train": {**EVERY_SECTION["train"], "ema_decay": 0.99}}
    assert ids(later) == ["d_model-32-84a544a091", "d_model-64-2c6f641f57"]
    power = {**EVERY_SECTION, "schedule": {"name": "power", "warmup_fraction": 0.1, "power_decay_fraction": 0.1},
             "train": {"global_batch_tokens": 256, "flops": 3e12}}
    assert ids(power) == ["d_model-32-16aeb7ab31", "d_model-64-2021469e68"]
    assert run_id(load_config(None).to_dict()) == "a605dfbb57"
    assert run_id(load_config(None, ["schedule.name=inverse_sqrt", "train.flops=1e12"]).to_dict()) == "5423ba4b68"


def test_a_run_registered_under_an_older_hash_is_not_registered_again(tmp_path):
    """An upgrade that changes how configs hash must not train a registered run a second time:
    the registry matches runs by their saved config hashed as today."""
    from testbed.sweep.registry import Registry

    base = {"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
            "data": {"seq_len": 32}, "train": {"global_batch_tokens": 256, "tokens": 25600},
            "logging": {"wandb": False, "progress": False}}
    spec = {"name": "t", "base": base, "grid": {"model.d_model": [32, 64]}}
    registry = Registry(tmp_path / "sweep")
    ids = registry.add_runs(load_sweep(spec))
    for run_id in ids:  # as an older version would have written them
        record = registry.read(run_id)
        record["config_hash"] = "0123456789"
        registry.write(record)
    again = registry.add_runs(load_sweep(spec))
    assert again == ids and len(registry.records()) == 2
