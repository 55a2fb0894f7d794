"""An ablation is one registered part plus a config value: no trainer edits."""

import json
import sys
import textwrap

import pytest

from testbed.config import load_config
from testbed.model.counting import count_params
from testbed.plan import describe, resolved_model
from testbed.train.trainer import train

POST_NORM = textwrap.dedent('''
    from testbed.model.transformer import PLACEMENTS, PreNormBlock

    @PLACEMENTS.register("post_test")
    class PostNormBlock(PreNormBlock):
        """x = norm(x + F(x)): the original Transformer's placement."""

        def forward(self, x):
            x = self.attn_norm(x + self.drop(self.attn(x)))
            return self.mlp_norm(x + self.drop(self.mlp(x)))
''')


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    (tmp_path / "post_norm_ablation.py").write_text(POST_NORM)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "post_norm_ablation"
    sys.modules.pop("post_norm_ablation", None)


def test_a_registered_placement_trains_and_is_counted(tmp_path, plugin):
    import torch

    from testbed.model.transformer import Transformer

    overrides = [f"imports=[{plugin}]", "model.norm_placement=post_test", "model.d_model=32",
                 "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "data.seq_len=32",
                 "train.global_batch_tokens=256", "train.steps=5", "logging.wandb=false",
                 "logging.progress=false", "train.eval_every=5"]
    config = load_config(None, overrides)
    info = describe(config)
    model = Transformer(resolved_model(config))
    assert info["n_params"] == sum(p.numel() for p in model.parameters())
    assert count_params(resolved_model(config)).matmul == sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    summary = train(config, tmp_path / "post")
    baseline = train(load_config(None, overrides[2:] + ["model.norm_placement=pre"]), tmp_path / "pre")
    assert summary["val_loss"] != baseline["val_loss"]  # the registered block really ran
    run = json.loads((tmp_path / "post" / "run.json").read_text())
    assert run["config"]["model"]["norm_placement"] == "post_test"


def test_a_sweep_axis_over_the_ablation_plans(tmp_path, plugin):
    from testbed.sweep.spec import load_sweep

    sweep = load_sweep({
        "name": "ablation",
        "base": {"imports": [plugin], "model": {"n_layers": 2, "n_heads": 2, "max_seq_len": 32},
                 "data": {"seq_len": 32}, "train": {"steps": 3, "global_batch_tokens": 256},
                 "logging": {"wandb": False, "progress": False}},
        "grid": {"model.norm_placement": ["pre", "post_test"], "model.d_model": [32, 64]},
    })
    assert len(sweep.runs) == 4
    labels = {tuple(sorted(r.labels.items())) for r in sweep.runs}
    assert len(labels) == 4
