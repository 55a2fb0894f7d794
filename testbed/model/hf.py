"""Convert a model's weights to a folder that `transformers` loads: LlamaForCausalLM, or
Qwen3ForCausalLM when the model normalises queries and keys.

Reading a training checkpoint is the trainer's business (testbed/train/export.py); this module
only converts a state dict and its ModelConfig.

The testbed's layout maps one-to-one onto Llama's once the fused projections are split:
qkv -> q_proj, k_proj, v_proj and gate_up -> gate_proj, up_proj. Rotary embeddings already use
Llama's "rotate half" layout, so no permutation is needed. With model.qk_norm the attention adds
an RMSNorm over head_dim to each query and key head, after the split into heads and before the
rotation: exactly Qwen3's q_norm / k_norm (transformers' modeling_qwen3 applies them to
`q_proj(x).view(..., head_dim)` and then `apply_rotary_pos_emb`), with the same eps as the
other norms. Qwen3 is otherwise Llama: no biases, SiLU-gated MLP, explicit head_dim, optional
tied embeddings; its sliding window stays off.

What no transformers class holds is refused, all reasons in one message (EXPORTABLE).

Given the EOS id of the run's tokenizer, config.json names it as BOS and EOS and
generation_config.json is written too; the tokenizer files themselves are the exporter's
(testbed/train/export.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from testbed.config import ModelConfig
from testbed.errors import TestbedError

# The config values the exported classes compute, and why every other value cannot be held.
EXPORTABLE = {
    "norm_placement": ("pre", "Llama and Qwen3 normalise only before each sublayer"),
    "norm": ("rmsnorm", "Llama and Qwen3 use RMSNorm (a LayerNorm has a mean and a bias they lack)"),
    "attention": ("sdpa", "only the built-in causal attention maps onto their attention"),
    "mlp": ("swiglu", "only the built-in SwiGLU maps onto their gated MLP"),
    "position": ("rope", "Llama and Qwen3 always rotate queries and keys"),
}


def unexportable(cfg: ModelConfig) -> list[str]:
    """Each config value the exported model could not reproduce, with the reason."""
    problems = []
    for key, (wanted, why) in EXPORTABLE.items():
        value = getattr(cfg, key)
        if value != wanted:
            problems.append(f"model.{key}={value!r} (needs {wanted!r}: {why})")
    if cfg.qk_norm and cfg.qk_norm_type != "rmsnorm":
        problems.append(f"model.qk_norm_type={cfg.qk_norm_type!r} (needs 'rmsnorm': Qwen3 normalises queries "
                        f"and keys with RMSNorm)")
    for key in ("norm_options", "qk_norm_options", "attention_options", "mlp_options", "position_options"):
        if getattr(cfg, key):
            problems.append(f"model.{key}={getattr(cfg, key)!r} (the exported classes take no part settings)")
    if cfg.width_mult != 1.0:
        problems.append(f"model.parametrization='mup' at width multiplier {cfg.width_mult:g} (the classes "
                        f"have no output multiplier and scale attention by 1/sqrt(d_head))")
    return problems


def check_exportable(cfg: ModelConfig) -> None:
    problems = unexportable(cfg)
    if problems:
        raise TestbedError("this model cannot be exported to a transformers class: " + "; ".join(problems))


def architecture(cfg: ModelConfig) -> str:
    """The transformers class the model exports as."""
    return "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"


def hf_config(cfg: ModelConfig, eos_token_id: int | None = None) -> dict:
    """config.json for the exported class. `eos_token_id`: the token that separated documents in
    training (a prepared folder's EOS), written as both BOS and EOS: every document the model saw
    followed one, so it is also what a text starts after. None (synthetic data): both null."""
    qwen3 = cfg.qk_norm
    config = {
        "architectures": [architecture(cfg)],
        "model_type": "qwen3" if qwen3 else "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: older releases read rope_theta, newer ones rope_parameters (whose
        # default theta differs between classes, so it is never left to a default).
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
    }
    if qwen3:
        config.update({"use_sliding_window": False, "sliding_window": None})
    else:
        config["mlp_bias"] = False
    return config


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    for i in range(cfg.n_layers):
        p, o = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk, wv = state[p + "attn.qkv.weight"].split([q, kv, kv], dim=0)
        gate, up = state[p + "mlp.gate_up.weight"].split(cfg.d_ff, dim=0)
        out.update({
            o + "self_attn.q_proj.weight": wq, o + "self_attn.k_proj.weight": wk,
            o + "self_attn.v_proj.weight": wv, o + "self_attn.o_proj.weight": state[p + "attn.out.weight"],
            o + "mlp.gate_proj.weight": gate, o + "mlp.up_proj.weight": up,
            o + "mlp.down_proj.weight": state[p + "mlp.down.weight"],
            o + "input_layernorm.weight": state[p + "attn_norm.weight"],
            o + "post_attention_layernorm.weight": state[p + "mlp_norm.weight"],
        })
        if cfg.qk_norm:
            out[o + "self_attn.q_norm.weight"] = state[p + "attn.q_norm.weight"]
            out[o + "self_attn.k_norm.weight"] = state[p + "attn.k_norm.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def generation_config(eos_token_id: int) -> dict:
    """generation_config.json: decoding stops at EOS, which also pads a batch (there is no pad
    token); everything else is transformers' default (greedy)."""
    return {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": eos_token_id}


def save_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path,
            eos_token_id: int | None = None) -> Path:
    """Write config.json + model.safetensors for the model's transformers class, and
    generation_config.json when the EOS token is known (see hf_config)."""
    from safetensors.torch import save_file

    check_exportable(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state(state, cfg), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg, eos_token_id), indent=1))
    if eos_token_id is not None:
        (out_dir / "generation_config.json").write_text(json.dumps(generation_config(eos_token_id), indent=1))
    return out_dir
