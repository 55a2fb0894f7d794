"""A norm defined outside the package, with a setting of its own, loaded by a config's
`imports: [user_norm]` (tests/test_part_options.py, docs/ablations.md): Dynamic Tanh (DyT, Zhu et
al. 2025, "Transformers without Normalization"), y = weight * tanh(alpha * x) + bias, with the
learnable scalar alpha starting at `model.norm_options.alpha`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from testbed.model.transformer import NORMS
from testbed.registry import Options


@dataclass(frozen=True)
class DyTOptions(Options):
    alpha: float = 0.5  # the initial alpha (the paper's default for non-LLM models)

    def check(self):
        self.require(self.alpha > 0, "alpha", "set it to a positive number, e.g. 0.5")


@NORMS.register("test_dyt", options=DyTOptions)
class DyT(nn.Module):
    def __init__(self, dim: int, eps: float, options: DyTOptions):
        super().__init__()
        self.alpha0 = options.alpha
        self.alpha = nn.Parameter(torch.empty(()))
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha0)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias
