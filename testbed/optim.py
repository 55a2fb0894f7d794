"""Optimisers behind a registry: an ablation registers a builder and sets optim.name.

`OPTIMIZERS` is the one list of valid `optim.name` values: the planner (`testbed.plan`)
checks a config against it before any run starts. torch is imported inside the builders only,
so that check (and `testbed sweep plan`) does not load torch. An optimiser may own settings, as a
model part does: `OPTIMIZERS.register("sgd", options=SGDOptions)`, reached as optim.options.FIELD.
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
    """Decay matrices (linear and embedding weights); never decay gains or biases (nanoGPT).

    A module may carry `lr_scale`: its matrices then train at lr x lr_scale, in a group of their
    own that records it (µP sets 1/m on the blocks, testbed/model/transformer.py); the trainer sets
    each group's lr to the schedule's times the group's `lr_scale`. Weight decay keeps its
    coefficient in every decayed group: AdamW multiplies it by the group's lr, so µP's hidden
    matrices decay by lr / m x weight_decay per step (docs/mup.md).
    Without any `lr_scale` (SP) the groups are the two above, as they always were."""
    matrices: list[tuple[nn.Parameter, float | None]] = []  # (weight, its module's lr_scale)
    no_decay: list[nn.Parameter] = []
    seen = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.dim() >= 2:
                matrices.append((p, getattr(module, "lr_scale", None)))
            else:
                no_decay.append(p)
    if all(scale is None for _, scale in matrices):
        return [{"params": [p for p, _ in matrices], "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]
    by_scale: dict[float, list[nn.Parameter]] = {}  # a scale of 1 shares the unscaled matrices' group
    for p, scale in matrices:
        by_scale.setdefault(1.0 if scale is None else scale, []).append(p)
    return [*({"params": params, "weight_decay": weight_decay, "lr_scale": scale}
              for scale, params in by_scale.items()),
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]


@OPTIMIZERS.register("adamw")
def adamw(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    import torch

    # The fused kernel is one launch per step on CUDA; on CPU the default (foreach) path is used.
    fused = device.type == "cuda"
    groups = param_groups(model, cfg.weight_decay)
    for group in groups:  # right from the start; the trainer resets every lr each step
        if "lr_scale" in group:
            group["lr"] = cfg.lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=cfg.lr,
                             betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, fused=fused)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimiser `optim.name` names; one that registered `options=` (testbed.registry.Options)
    is also given `options=` its settings from optim.options."""
    return OPTIMIZERS.build(cfg.name, model, cfg, device, options=cfg.options, key="optim.options")
