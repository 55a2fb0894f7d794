"""A model part owns its settings as a schedule does (docs/ablations.md, "A part with its own
settings"): one file registering a norm with an `Options` dataclass, `imports:` and a config line
train with it; its field is validated where declared, listed with the part, and counted in the
run id only away from its default. QK-norm takes any registered norm."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from testbed.config import config_hash, load_config
from testbed.errors import ConfigError

HERE = Path(__file__).resolve().parent
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "data.seq_len=32",
        "train.global_batch_tokens=256", "train.log_every=1", "train.eval_every=100", "logging.wandb=false",
        "logging.progress=false", "data.val_sequences=8", "checkpoint.final=false", "train.steps=2"]
DYT = TINY + ["imports=[user_norm]", "model.norm=test_dyt"]


@pytest.fixture()
def on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def test_a_user_norm_with_a_setting_trains_from_one_file_and_a_config_line(tmp_path, on_path):
    from testbed.model.transformer import Transformer
    from testbed.train.trainer import train

    config = load_config(None, DYT + ["model.norm_options.alpha=0.25"])
    assert config.model.norm_options == {"alpha": 0.25}
    model = Transformer(dataclasses.replace(config.model, vocab_size=64))
    alphas = {name: p.item() for name, p in model.named_parameters() if name.endswith(".alpha")}
    assert len(alphas) == 2 * 2 + 1 and set(alphas.values()) == {0.25}  # two per block and the final norm
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".alpha"):
                p.fill_(9.0)
    model.reset_parameters()  # the part re-initialises itself: no type check in the model
    assert {p.item() for name, p in model.named_parameters() if name.endswith(".alpha")} == {0.25}
    train(config, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_a_bad_setting_is_one_error_naming_the_field(on_path):
    with pytest.raises(ConfigError, match=r"^model\.norm_options\.alpha is -1\.0; set it to a positive number"):
        load_config(None, DYT + ["model.norm_options.alpha=-1"])
    with pytest.raises(ConfigError, match=r"model\.norm_options\.alpha='big' must be a number"):
        load_config(None, DYT + ["model.norm_options.alpha=big"])
    with pytest.raises(ConfigError, match=r"model\.norm_options\.alpah is 1 but norm 'test_dyt' has no alpah; "
                                          r"did you mean 'alpha'"):
        load_config(None, DYT + ["model.norm_options.alpah=1"])
    import testbed.model.transformer  # noqa: F401  (the built-in norms registered)

    with pytest.raises(ConfigError, match=r"model\.norm_options\.alpha is 0\.5 but norm 'rmsnorm' has no settings"):
        load_config(None, TINY + ["model.norm_options.alpha=0.5"])


def test_the_setting_is_listed_with_the_part(on_path):
    load_config(None, DYT)
    from testbed.model.transformer import NORMS

    assert "test_dyt (alpha=0.5)" in NORMS.listing() and "rmsnorm" in NORMS.listing()


def test_the_run_id_counts_the_setting_only_away_from_its_default(on_path):
    def run_id(*overrides):
        return config_hash(load_config(None, DYT + list(overrides)).to_dict())

    plain = run_id()
    assert run_id("model.norm_options.alpha=0.5") == plain  # the default, given explicitly
    assert run_id("model.norm_options.alpha=0.25") != plain
    # A config that names no part settings keeps the id it had before parts owned settings
    # (tests/test_isoflop.py pins more).
    assert config_hash(load_config(None).to_dict()) == "a605dfbb57"
    assert config_hash(load_config(None, ["model.qk_norm_type=rmsnorm"]).to_dict()) == "a605dfbb57"


def test_qk_norm_takes_any_registered_norm(on_path):
    from testbed.model.transformer import Transformer

    config = load_config(None, DYT + ["model.qk_norm=true", "model.qk_norm_type=test_dyt",
                                      "model.qk_norm_options.alpha=2", "model.norm=rmsnorm"])
    cfg = dataclasses.replace(config.model, vocab_size=64)
    model = Transformer(cfg)
    attn = model.blocks[0].attn
    assert type(attn.q_norm).__name__ == "DyT" and attn.q_norm.alpha.item() == 2.0
    assert attn.q_norm.weight.shape == (cfg.head_dim,)
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 64)
    layer = Transformer(load_config(None, TINY + ["model.qk_norm=true", "model.qk_norm_type=layernorm",
                                                  "model.vocab_size=64"]).model)
    assert isinstance(layer.blocks[0].attn.k_norm, torch.nn.LayerNorm)
    with pytest.raises(ConfigError, match=r"^model\.qk_norm_type='rmsnrom' is not a registered norm; "
                                          r"did you mean 'rmsnorm'"):
        Transformer(load_config(None, TINY + ["model.qk_norm=true", "model.qk_norm_type=rmsnrom",
                                              "model.vocab_size=64"]).model)


def test_an_optimiser_owns_its_settings_too():
    from dataclasses import dataclass

    from torch import nn

    from testbed.optim import OPTIMIZERS, build_optimizer
    from testbed.registry import Options

    @dataclass(frozen=True)
    class SGDOptions(Options):
        momentum: float = 0.0

        def check(self):
            self.require(0 <= self.momentum < 1, "momentum", "set it in [0, 1)")

    @OPTIMIZERS.register("test_sgd", options=SGDOptions)
    def sgd(model, cfg, device, options):
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=options.momentum)

    config = load_config(None, ["optim.name=test_sgd", "optim.options.momentum=0.9"])
    optimizer = build_optimizer(nn.Linear(2, 2), config.optim, torch.device("cpu"))
    assert optimizer.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ConfigError, match=r"^optim\.options\.momentum is 1\.5; set it in \[0, 1\)"):
        load_config(None, ["optim.name=test_sgd", "optim.options.momentum=1.5"])
    with pytest.raises(ConfigError, match=r"optim\.options\.momentum is 0\.9 but optimiser 'adamw' has no settings"):
        load_config(None, ["optim.options.momentum=0.9"])
    plain = config_hash(load_config(None, ["optim.name=test_sgd"]).to_dict())
    assert config_hash(load_config(None, ["optim.name=test_sgd", "optim.options.momentum=0"]).to_dict()) == plain
    assert config_hash(config.to_dict()) != plain
