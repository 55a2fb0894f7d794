"""Closed-form parameter and FLOP counts, checked against the live module in the tests.

N (total) counts every parameter once (a tied head shares the embedding). Following Kaplan et
al. (2020), the embedding parameters are the token embedding plus an untied output head, and
N_non_embedding is everything else (attention, MLP and norm weights).

Training FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B):
    6 * N_matmul + 12 * n_layers * seq_len * d_model
where N_matmul is every weight that takes part in a matrix multiply (all linear layers and the
output head, tied or not; the embedding lookup and the norms are not matmuls), 6 = 2 FLOPs per
multiply-add x (1 forward + 2 backward), and the second term is the attention scores
(Q K^T and A V, forward and backward) over the full seq_len x seq_len matrix, as PaLM counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    non_embedding: int
    embedding: int
    matmul: int  # weights used in matrix multiplies (for FLOPs)


BUILTIN_PARTS = {"norm": ("rmsnorm", "layernorm"), "norm_placement": ("pre", "peri"),
                 "attention": ("sdpa",), "mlp": ("swiglu",), "position": ("rope", "none"),
                 "qk_norm_type": ("rmsnorm",)}
# A part given settings (model.*_options) is counted on the meta device like a user's part.
PART_OPTIONS_KEYS = ("norm_options", "qk_norm_options", "attention_options", "mlp_options", "position_options")


def is_builtin(cfg: ModelConfig) -> bool:
    return (all(getattr(cfg, key) in names for key, names in BUILTIN_PARTS.items())
            and not any(getattr(cfg, key) for key in PART_OPTIONS_KEYS))


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Closed form for the built-in parts; a registered ablation part is counted on the meta
    device (no memory), since its shape is only known to its own code."""
    d, L, V, hd = cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.head_dim
    if V is None:
        raise ValueError("vocab_size must be resolved before counting parameters")
    if not is_builtin(cfg):
        return count_on_meta(cfg)
    attn = d * (cfg.n_heads + 2 * cfg.kv_heads) * hd + cfg.n_heads * hd * d
    mlp = 3 * d * cfg.d_ff
    norms_per_layer = (2 if cfg.norm_placement == "pre" else 4) * d
    if cfg.norm == "layernorm":
        norms_per_layer *= 2  # weight and bias
    qk_norm = 2 * hd if cfg.qk_norm else 0
    final_norm = d * (2 if cfg.norm == "layernorm" else 1)
    non_embedding = L * (attn + mlp + norms_per_layer + qk_norm) + final_norm
    embedding = V * d * (1 if cfg.tie_embeddings else 2)
    matmul = L * (attn + mlp) + V * d
    return ParamCounts(total=non_embedding + embedding, non_embedding=non_embedding,
                       embedding=embedding, matmul=matmul)


def count_on_meta(cfg: ModelConfig) -> ParamCounts:
    import torch
    from torch import nn

    from testbed.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel()
    if model.head.weight is not model.embed.weight:
        embedding += model.head.weight.numel()
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return ParamCounts(total=total, non_embedding=total - embedding, embedding=embedding, matmul=matmul)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward)."""
    return 6 * count_params(cfg).matmul + 12 * cfg.n_layers * seq_len * cfg.d_model


def mfu(tokens_per_second: float, cfg: ModelConfig, seq_len: int, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (None if unknown)."""
    if not peak_flops:
        return None
    return tokens_per_second * flops_per_token(cfg, seq_len) / peak_flops
