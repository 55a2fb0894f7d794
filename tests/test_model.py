"""Parameter counts, FLOPs, the model ladder and Hugging Face export, against the live module."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from testbed.config import ModelConfig, load_config
from testbed.model.counting import count_params, flops_per_token
from testbed.model.transformer import Transformer

VARIANTS = [
    {},
    {"tie_embeddings": True},
    {"norm_placement": "peri", "qk_norm": True},
    {"n_kv_heads": 2, "ffn_ratio": 3.5},
    {"norm": "layernorm", "n_layers": 3},
]


def tiny(**kw) -> ModelConfig:
    base = dict(d_model=64, n_layers=2, n_heads=4, vocab_size=96, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def live_counts(model: Transformer) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once
    embedding = model.embed.weight.numel()
    if model.head.weight is not model.embed.weight:
        embedding += model.head.weight.numel()
    return total, embedding


@pytest.mark.parametrize("kw", VARIANTS)
def test_closed_form_counts_match_the_module(kw):
    cfg = tiny(**kw)
    counts = count_params(cfg)
    total, embedding = live_counts(Transformer(cfg))
    assert counts.total == total
    assert counts.embedding == embedding
    assert counts.non_embedding == total - embedding


@pytest.mark.parametrize("kw", VARIANTS[:4])
def test_training_flops_match_a_flop_counter(kw):
    """6 N_matmul from the counter's matmuls; the attention term 12 L T d from explicit
    score and value matmuls (the counter does not see inside the fused CPU attention kernel)."""
    cfg = tiny(**kw)
    T, B = 32, 2
    model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(x, x).backward()
    linear_flops = counter.get_total_flops() / (B * T)
    assert linear_flops == 6 * count_params(cfg).matmul

    q = torch.randn(B, cfg.n_heads, T, cfg.head_dim, requires_grad=True)
    k = torch.randn(B, cfg.n_heads, T, cfg.head_dim, requires_grad=True)
    v = torch.randn(B, cfg.n_heads, T, cfg.head_dim, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        ((q @ k.transpose(-1, -2)).softmax(-1) @ v).sum().backward()
    attention_per_token = cfg.n_layers * counter.get_total_flops() / (B * T)
    assert linear_flops + attention_per_token == flops_per_token(cfg, T)


def test_flops_formula_is_the_palm_formula():
    cfg = tiny()
    n = count_params(cfg)
    assert flops_per_token(cfg, 128) == 6 * n.matmul + 12 * cfg.n_layers * 128 * cfg.d_model
    # the head is a matmul whether or not it is tied
    assert count_params(tiny(tie_embeddings=True)).matmul == n.matmul


def parse_size(name: str) -> float:
    return float(name[:-1]) * {"k": 1e3, "m": 1e6, "b": 1e9}[name[-1]]


LADDER = ["100k", "300k", "1m", "3m", "10m", "30m", "100m", "300m", "1b"]


@pytest.mark.parametrize("name", LADDER)
def test_ladder_rung_matches_its_name_without_allocating(name):
    cfg = load_config(None, [f"model.preset={name}", "model.vocab_size=32000"]).model
    with torch.device("meta"):
        model = Transformer(cfg)
    total, embedding = live_counts(model)
    assert all(p.is_meta for p in model.parameters())
    assert total - embedding == count_params(cfg).non_embedding
    assert abs(count_params(cfg).non_embedding / parse_size(name) - 1) < 0.10


def test_ladder_spans_1e5_to_1e9():
    sizes = [parse_size(n) for n in LADDER]
    assert min(sizes) <= 1e5 and max(sizes) >= 1e9
    assert sizes == sorted(sizes)


def test_meta_build_then_materialise_gives_a_working_model():
    cfg = tiny()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.reset_parameters()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    loss = model(x, x)
    assert math.isfinite(loss.item())
    # a fresh model predicts roughly uniformly: loss near ln V
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5


def test_attention_is_causal():
    cfg = tiny()
    model = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[0, :10], b[0, :10])
    assert not torch.allclose(a[0, 10:], b[0, 10:])


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True}, {"n_kv_heads": 2}, {"qk_norm": True},
                                {"qk_norm": True, "tie_embeddings": True, "n_kv_heads": 2, "rope_theta": 500.0}])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, kw):
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from testbed.model.hf import architecture, hf_config, to_hf_state

    torch.manual_seed(0)
    cfg = tiny(**kw)
    model = Transformer(cfg).eval()
    # perturb the norms (q_norm and k_norm included) so a mapping mistake between norms would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    state = {k: v for k, v in model.state_dict().items()}
    save_file(to_hf_state(state, cfg), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg)))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == architecture(cfg) == ("Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM")
    assert hf.config.rope_parameters["rope_theta"] == cfg.rope_theta
    x = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        ours = model(x)
        theirs = hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    if cfg.qk_norm:  # the q/k norms are live in both: zeroing them changes the logits
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.self_attn.q_norm.weight.mul_(0.5)
            assert (ours - hf(x).logits).abs().max().item() > 1e-3


def test_export_refuses_what_no_transformers_class_holds():
    from testbed.errors import TestbedError
    from testbed.model.hf import check_exportable

    with pytest.raises(TestbedError, match="norm_placement") as err:
        check_exportable(tiny(norm_placement="peri", norm="layernorm", position="none", mlp="my_mlp"))
    message = str(err.value)
    # one message naming every part that cannot be exported, each with its reason
    for part in ("model.norm_placement='peri'", "model.norm='layernorm'", "model.position='none'",
                 "model.mlp='my_mlp'"):
        assert part in message
    assert "\n" not in message and message.count("needs") == 4
    check_exportable(tiny(qk_norm=True))  # Qwen3 holds it
