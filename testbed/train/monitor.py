"""What the trainer measures about itself beside the loss: the logging window's averages and
speed, per-block gradient and update norms, loss spikes and the divergence guard. The state that
must survive a resume (the running mean, the spike count, the lowest loss) is `LossWatch.state`,
saved in every checkpoint."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from testbed.errors import TestbedError


class Diverged(TestbedError):
    """The training loss climbed far above its lowest value without becoming NaN."""


# The running mean that loss spikes are measured against: an EMA over logged training losses.
SPIKE_EMA_DECAY = 0.9


def significant(values: list[float], digits: int = 4) -> list[float]:
    """Numbers cut to a few significant digits: per-layer lists stay short in metrics.jsonl."""
    return [float(f"{v:.{digits}g}") for v in values]


def squared_norms(groups: list[list[torch.Tensor | None]], device: torch.device) -> torch.Tensor:
    """The summed squares of each group's tensors (this process's shards under FSDP2), in fp32."""
    out = torch.zeros(len(groups), dtype=torch.float32, device=device)
    for i, tensors in enumerate(groups):
        for t in tensors:
            if t is not None:
                local = t.to_local() if hasattr(t, "to_local") else t
                out[i] += local.detach().float().square().sum()
    return out


class Window:
    """The training-loss average and the tokens/s of one logging window. Validation and
    checkpoints that fall inside a window are taken out of its time (tokens_per_s is the speed
    of training steps)."""

    def __init__(self, device: torch.device, timing: dict[str, float]):
        self.timing = timing
        self.loss_sum = torch.zeros((), device=device)
        self.z_sum = torch.zeros((), device=device)  # the z-loss term, when optim.z_loss is on
        self.steps = 0
        self.restart()

    def paused(self) -> float:
        return self.timing["eval_s"] + self.timing["checkpoint_s"]

    def restart(self) -> None:
        self.t0, self.tokens, self.paused_at_start = time.perf_counter(), 0, self.paused()

    def tokens_per_s(self) -> float | None:
        elapsed = time.perf_counter() - self.t0 - (self.paused() - self.paused_at_start)
        return self.tokens / elapsed if self.tokens else None


class LossWatch:
    """Loss spikes (a logged training loss more than `spike_nats` above the EMA of the ones
    before it) and the divergence guard (more than `divergence_nats` above the lowest logged
    loss since warmup ended: the run stops as failed). None disables either."""

    def __init__(self, spike_nats: float | None, divergence_nats: float | None):
        self.spike_nats, self.divergence_nats = spike_nats, divergence_nats
        self.loss_min = math.inf  # lowest logged training loss since warmup
        self.loss_ema: float | None = None  # running mean of logged training losses
        self.spikes = 0  # loss spikes counted so far

    def state(self) -> dict[str, Any]:
        return {"loss_min": self.loss_min if math.isfinite(self.loss_min) else None,
                "loss_ema": self.loss_ema, "spikes": self.spikes}

    def restore(self, state: dict[str, Any]) -> None:
        loss_min = state.get("loss_min")
        self.loss_min = float(loss_min) if isinstance(loss_min, (int, float)) else math.inf
        self.loss_ema = state.get("loss_ema")
        self.spikes = int(state.get("spikes") or 0)

    def spike(self, loss: float) -> dict:
        """`spikes` (the count so far) and, on a spike, `spike` (nats above the running mean)."""
        if self.spike_nats is None or not math.isfinite(loss):
            return {}
        out: dict = {}
        if self.loss_ema is not None and loss > self.loss_ema + self.spike_nats:
            self.spikes += 1
            out["spike"] = loss - self.loss_ema
        self.loss_ema = loss if self.loss_ema is None else \
            SPIKE_EMA_DECAY * self.loss_ema + (1 - SPIKE_EMA_DECAY) * loss
        out["spikes"] = self.spikes
        return out

    def check_divergence(self, step: int, loss: float, warmup_steps: int, lr: float) -> None:
        """Raise Diverged when the logged loss (the same on every process) is too far above its
        lowest value since warmup ended."""
        margin = self.divergence_nats
        if margin is None or step <= warmup_steps or not math.isfinite(loss):
            return
        if loss > self.loss_min + margin:
            raise Diverged(f"the training loss diverged to {loss:.4g} at step {step}, more than "
                           f"train.divergence_nats={margin:g} above its lowest {self.loss_min:.4g}; the "
                           f"last good checkpoints are kept. Lower optim.lr (now {lr}) or raise warmup, "
                           f"or raise train.divergence_nats (null disables the guard)")
        self.loss_min = min(self.loss_min, loss)
