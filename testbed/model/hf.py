"""Convert a model's weights to a folder that `transformers` loads as LlamaForCausalLM.

Reading a training checkpoint is the trainer's business (testbed/train/export.py); this module
only converts a state dict and its ModelConfig.

The testbed's layout maps one-to-one onto Llama's once the fused projections are split:
qkv -> q_proj, k_proj, v_proj and gate_up -> gate_proj, up_proj. Rotary embeddings already use
Llama's "rotate half" layout, so no permutation is needed. Only the Llama-compatible subset
exports: pre-norm, RMSNorm, SwiGLU, RoPE, no QK-norm.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from testbed.config import ModelConfig
from testbed.errors import TestbedError


def check_exportable(cfg: ModelConfig) -> None:
    problems = []
    if cfg.norm_placement != "pre":
        problems.append(f"model.norm_placement={cfg.norm_placement!r} (Llama is 'pre')")
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm!r} (Llama is 'rmsnorm')")
    if cfg.qk_norm:
        problems.append("model.qk_norm=true (Llama has none)")
    if cfg.mlp != "swiglu" or cfg.attention != "sdpa" or cfg.position != "rope":
        problems.append("a non-Llama mlp, attention or position")
    if cfg.width_mult != 1.0:
        problems.append(f"model.parametrization='mup' at width multiplier {cfg.width_mult:g} (Llama has "
                        f"no output multiplier and scales attention by 1/sqrt(d_head))")
    if problems:
        raise TestbedError("this model cannot be exported as Llama: " + "; ".join(problems))


def llama_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": None,
    }


def to_llama_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
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
    return {k: v.contiguous().clone() for k, v in out.items()}


def save_llama(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors for LlamaForCausalLM from a model state dict."""
    from safetensors.torch import save_file

    check_exportable(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(to_llama_state(state, cfg), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(llama_config(cfg), indent=1))
    return out_dir
