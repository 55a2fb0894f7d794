"""Optimisers behind a registry: an ablation registers a builder and sets optim.name.

`OPTIMIZERS` is the one list of valid `optim.name` values: the planner (`testbed.plan`)
checks a config against it before any run starts. torch is imported inside the builders only,
so that check (and `testbed sweep plan`) does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from testbed.config import OptimConfig
from testbed.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

OPTIMIZERS = Registry("optimiser", "optim.name")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); never decay gains or biases (nanoGPT)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@OPTIMIZERS.register("adamw")
def adamw(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    import torch

    # The fused kernel is one launch per step on CUDA; on CPU the default (foreach) path is used.
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, fused=fused)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.name)(model, cfg, device)
