"""A Llama-style decoder-only transformer in one readable file.

RMSNorm, rotary positions, SwiGLU, causal attention through torch's
scaled_dot_product_attention (flash / memory-efficient kernels on GPU). Every part is looked up
in a registry by its config name, so an ablation registers one function and sets one config
value (see docs/ablations.md):

    NORMS       model.norm          a normalisation layer factory (dim, eps) -> nn.Module
                model.qk_norm_type  (the same registry) the norm of each query and key head
    PLACEMENTS  model.norm_placement how a block wires norms around its sublayers (pre, peri)
    ATTENTIONS  model.attention     the attention sublayer
    MLPS        model.mlp           the feed-forward sublayer
    POSITIONS   model.position      positional encoding applied to q and k
    INITS       model.init          weight initialisation of the whole model

A part may own settings: a frozen `testbed.registry.Options` dataclass given at registration
(`NORMS.register("dyt", options=DyTOptions)`); it is then built with `options=` that dataclass,
filled from the config's model.norm_options (model.qk_norm_options, attention_options,
mlp_options, position_options). A part re-initialises its own weights: `Transformer.reset_parameters`
calls the `reset_parameters` of every module but the matrices the init draws (nn.Linear,
nn.Embedding), so a user's norm with a gain needs no edit here.

Parameter and FLOP arithmetic lives beside it in counting.py.

Under `model.parametrization: mup` (µP, Yang et al. 2022) four things follow the width multiplier
m = d_model / mup_base_width, as in Table 1 of Cerebras' "Practitioner's Guide to the Maximal
Update Parameterization" (Dey et al. 2024), with its tunable input and output multipliers at 1
(MiniCPM scales init, learning rates and logits the same way):

    hidden matrices (every matrix in the blocks)  init std  init_std / sqrt(m),  AdamW lr  lr / m
    embedding, output head (tied or not), gains   init std  init_std,            AdamW lr  lr
    output logits                                 head(h / m)
    attention scores                              q.k / d_head (times sqrt(d_head at the base))

At m = 1 every factor is 1, so µP at the base width is SP exactly: hyperparameters tuned there
carry over to wider models. The lr factor reaches the optimiser as each block module's
`lr_scale` (testbed/optim.py groups parameters by it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from testbed.config import ModelConfig
from testbed.model.loss import linear_cross_entropy, linear_cross_entropy_terms
from testbed.registry import Registry

NORMS = Registry("norm", "model.norm")
PLACEMENTS = Registry("norm placement", "model.norm_placement")
ATTENTIONS = Registry("attention", "model.attention")
MLPS = Registry("MLP", "model.mlp")
POSITIONS = Registry("positional encoding", "model.position")
INITS = Registry("initialisation", "model.init")


# ----------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like Llama: bf16 sums of squares lose precision.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


NORMS.register("rmsnorm")(RMSNorm)


@NORMS.register("layernorm")
def layernorm(dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps)


# ----------------------------------------------------------------------------- positions


class Rotary(nn.Module):
    """Rotary position embedding in the "rotate half" layout that Hugging Face Llama uses,
    so exported weights need no permutation."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        # Not saved in checkpoints: they are a pure function of the config.
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.cos.is_meta:
            return
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        freqs = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64), inv_freq)
        self.cos.copy_(torch.cat((freqs, freqs), dim=-1).cos())
        # The sign of rotate_half, cat(-x2, x1), is folded into sin: rotate_half(x) * sin equals
        # swap_halves(x) * cat(-sin, sin), which saves a negation in forward and backward.
        self.sin.copy_(torch.cat((-freqs, freqs), dim=-1).sin())

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = q.shape[-2]
        cos, sin = self.cos[:T].to(q.dtype), self.sin[:T].to(q.dtype)
        return q * cos + swap_halves(q) * sin, k * cos + swap_halves(k) * sin


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


@POSITIONS.register("rope")
def rope(cfg: ModelConfig) -> nn.Module:
    return Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)


class NoPosition(nn.Module):
    def forward(self, q, k):
        return q, k


POSITIONS.register("none")(lambda cfg: NoPosition())


# ----------------------------------------------------------------------------- sublayers


@ATTENTIONS.register("sdpa")
class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # One fused projection for q, k and v: one matmul instead of three.
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.out.is_residual_output = True
        self.position = POSITIONS.build(cfg.position, cfg, options=cfg.position_options,
                                        key="model.position_options")
        self.q_norm = qk_norm(cfg) if cfg.qk_norm else None
        self.k_norm = qk_norm(cfg) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.scale = attention_scale(cfg)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, heads, T, d_head] and k, v [B, kv_heads, T, d_head], QK-norm and positions applied."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (model.qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.position(q, k)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.heads(x)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            enable_gqa=self.kv_heads != self.n_heads)
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The attention logits [B, heads, T, T] forward's softmax reads (q.k times the scale, in
        fp32), the future masked to -inf: for measuring attention-logit growth, not for training."""
        q, k, _ = self.heads(x)
        k = k.repeat_interleave(self.n_heads // self.kv_heads, dim=1)  # grouped-query heads share their key
        scale = self.scale if self.scale is not None else self.head_dim ** -0.5
        logits = (q @ k.transpose(-2, -1)).float() * scale
        T = x.shape[1]
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        return logits.masked_fill(future, float("-inf"))


def norm(cfg: ModelConfig) -> nn.Module:
    """The model's norm over d_model (model.norm with its model.norm_options)."""
    return NORMS.build(cfg.norm, cfg.d_model, cfg.norm_eps, options=cfg.norm_options, key="model.norm_options")


def qk_norm(cfg: ModelConfig) -> nn.Module:
    """The norm of each query or key head (model.qk_norm_type with model.qk_norm_options)."""
    return NORMS.build(cfg.qk_norm_type, cfg.head_dim, cfg.norm_eps, options=cfg.qk_norm_options,
                       key="model.qk_norm_options", name_key="model.qk_norm_type")


def attention_scale(cfg: ModelConfig) -> float | None:
    """The factor on q.k: None (SDPA's 1/sqrt(d_head)) under SP. Under µP 1/d_head, since q and k
    become correlated in training and their dot product then grows like d_head, not its root; times
    sqrt(d_head at the base width) so that it is SP's 1/sqrt(d_head) there. That base d_head is
    `mup_base_head_dim`, by default d_head / m (width grown at a fixed head count), giving
    1 / sqrt(d_head * m); widening by heads at a fixed head width leaves it d_head: SP's scale."""
    if cfg.parametrization != "mup":
        return None
    base_head_dim = cfg.mup_base_head_dim or cfg.head_dim / cfg.width_mult
    return math.sqrt(base_head_dim) / cfg.head_dim


@MLPS.register("swiglu")
class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d_ff = cfg.d_ff
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)  # fused gate and up
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.down.is_residual_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.d_ff, dim=-1)
        return self.down(F.silu(gate) * up)


# ----------------------------------------------------------------------------- blocks


@PLACEMENTS.register("pre")
class PreNormBlock(nn.Module):
    """x + F(norm(x)): the Llama / GPT-2 placement."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.mlp_norm = norm(cfg), norm(cfg)
        self.attn = ATTENTIONS.build(cfg.attention, cfg, options=cfg.attention_options, key="model.attention_options")
        self.mlp = MLPS.build(cfg.mlp, cfg, options=cfg.mlp_options, key="model.mlp_options")
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x)))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


@PLACEMENTS.register("peri")
class PeriNormBlock(PreNormBlock):
    """x + norm_out(F(norm_in(x))): Peri-LN (Kim et al. 2025), which bounds each sublayer's
    contribution to the residual stream."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.attn_out_norm, self.mlp_out_norm = norm(cfg), norm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn_out_norm(self.attn(self.attn_norm(x))))
        return x + self.drop(self.mlp_out_norm(self.mlp(self.mlp_norm(x))))


# ----------------------------------------------------------------------------- init


@INITS.register("normal")
def init_normal(model: Transformer, cfg: ModelConfig) -> None:
    """N(0, init_std) for every matrix, as Hugging Face Llama does."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)


@INITS.register("scaled")
def init_scaled(model: Transformer, cfg: ModelConfig) -> None:
    """N(0, init_std), with residual output projections scaled by 1/sqrt(2 n_layers)
    (GPT-2) so the residual stream's variance does not grow with depth."""
    init_normal(model, cfg)
    for module in model.modules():
        if getattr(module, "is_residual_output", False):
            nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))


# ----------------------------------------------------------------------------- model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        block = PLACEMENTS.get(cfg.norm_placement)
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.n_layers))
        self.norm = norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # µP (module docstring): the output multiplier 1/m; the matrices of the blocks train at lr / m.
        self.output_mult = 1.0 / cfg.width_mult if cfg.parametrization == "mup" else None
        if cfg.parametrization == "mup":
            for module in self.blocks.modules():
                module.lr_scale = 1.0 / cfg.width_mult
        self.activation_checkpointing = False
        self.compile_loss = False  # set by the trainer where it compiles the blocks
        # Set by the trainer under train.cuda_graphs: `hidden` compiled whole into CUDA graphs,
        # used in training mode only; evaluation (other shapes, no gradients) stays eager.
        self.graphed_hidden: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise every weight; also after building on the meta device and `to_empty`."""
        INITS.get(self.cfg.init)(self, self.cfg)
        # Every other part re-initialises itself (norm gains, rotary tables, a user's part): the
        # matrices are the init's, whose draws a reset_parameters of their own would replace.
        for module in self.modules():
            if module is not self and not isinstance(module, (nn.Linear, nn.Embedding)):
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
        if self.cfg.parametrization == "mup":
            # µP: hidden matrices' std / sqrt(m), whatever the init (or a part) drew (the embedding
            # and the head keep init_std). Scaling the draw keeps the random stream, so m = 1 is SP's.
            for p in self.blocks.parameters():
                if p.dim() >= 2:
                    p.mul_(self.cfg.width_mult ** -0.5)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The final norm's output [B, T, d] for token ids [B, T] (µP's output multiplier
        applied): everything before the head."""
        x = self.embed(idx)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        if self.output_mult is not None:
            x = x * self.output_mult  # µP: logits = head(h) / m, also inside the fused loss
        return x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean", z_loss: float | None = None, logits_at: torch.Tensor | None = None):
        """Logits [B, T, V] for token ids [B, T]; with targets [B, T], the cross-entropy in nats
        (mean or sum over tokens), computed without materialising the logits (loss.py). With
        z_loss (a weight) the tuple (objective, cross-entropy, lse^2 term) instead, the
        objective being cross-entropy + z_loss * lse^2 term (PaLM's z-loss). With logits_at (a
        bool mask [B, T]) only the logits of those positions, [n, V]: the answers a task scores
        are a few positions of each sequence."""
        graphed = self.graphed_hidden if self.training else None
        x = graphed(idx) if graphed is not None else self.hidden(idx)
        if logits_at is not None:
            return self.head(x[logits_at])
        if targets is None:
            return self.head(x)
        if z_loss is not None:
            return linear_cross_entropy_terms(x, self.head.weight, targets, z_loss, reduction,
                                              compiled=self.compile_loss)
        return linear_cross_entropy(x, self.head.weight, targets, reduction, compiled=self.compile_loss)
