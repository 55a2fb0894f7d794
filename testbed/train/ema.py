"""An exponential moving average (EMA) of the weights, kept beside training (`train.ema_decay`).

    ema_0 = the weights training starts from,   ema_t = decay * ema_{t-1} + (1 - decay) * w_t

after every optimiser step t. Averaging the weights of a constant-learning-rate run is an
alternative to a cooldown (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond
Fixed Training Durations"). The copy is a second, unwrapped model in fp32 on the training device,
updated with one fused `torch._foreach_lerp_` (torch.optim.swa_utils.get_ema_multi_avg_fn): no
host sync, no per-tensor Python loop. torch's AveragedModel is not used: its update reads its
step counter on the host, a sync every step on a GPU. Under DDP every process holds the same
weights, so every process keeps the same average and evaluates its share of the validation set.
"""

from __future__ import annotations

import copy

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        # A copy made before the model is compiled or wrapped: a plain module to evaluate.
        self.model = copy.deepcopy(model).float().eval()
        self.model.requires_grad_(False)
        # Parameters only (a tied head is one parameter, listed once); the buffers (rotary
        # tables) are constants, copied with the model.
        self.averaged = list(self.model.parameters())
        self.live = [p.detach() for p in model.parameters()]
        self.lerp = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(self) -> None:
        """After an optimiser step: ema <- ema + (1 - decay) * (w - ema), all tensors at once."""
        self.lerp(self.averaged, self.live, None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's own names (what model.safetensors holds)."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k == "head.weight" and self.model.cfg.tie_embeddings)]
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing}, unexpected {unexpected}")
