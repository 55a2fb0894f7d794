"""Find the largest micro-batch that fits a config on the current device."""

from __future__ import annotations

import torch

from testbed.config import Config
from testbed.errors import TestbedError


def fits(config: Config, micro: int, device: torch.device) -> bool:
    """Two real training steps (forward, backward, optimiser) at this micro-batch. The second is
    the steady state: its forward and backward run beside the optimiser's moments, which the
    first step's `optimizer.step()` creates; and like a logging step it holds a copy of the
    weights through the update (the trainer measures the update's norm against it)."""
    from testbed.model.transformer import Transformer
    from testbed.optim import build_optimizer
    from testbed.plan import resolved_model
    from testbed.train import device as dev

    cfg = resolved_model(config)
    dtype = dev.resolve_precision(config.train.precision, device)
    model = optimizer = averaged = None
    try:
        # Built on the device itself: a probe needs no reproducible weights, and initialising a
        # 1B model on the host takes seconds per probe.
        with torch.device(device):
            model = Transformer(cfg)
        model.activation_checkpointing = config.train.activation_checkpointing
        optimizer = build_optimizer(model, config.optim, device)
        if config.train.ema_decay:  # the moving average of the weights is one more fp32 copy
            averaged = [p.detach().float().clone() for p in model.parameters()]
        x = torch.randint(0, cfg.vocab_size, (micro, config.data.seq_len + 1), device=device)
        for _ in range(2):
            with dev.autocast(device, dtype):
                loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            weights = [p.detach().clone() for p in model.parameters()]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss, weights
        dev.synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del model, optimizer, averaged
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_micro_batch(config: Config, limit: int = 4096, divisor_of: int | None = None) -> int:
    """The largest micro-batch (at most `limit`, and dividing `divisor_of` when given) whose
    training step fits: a binary search over the candidates. Needs a GPU (a CPU has no fixed
    limit). The probe runs eagerly, which needs at least the memory of a compiled step."""
    from testbed.train import device as dev

    device = dev.resolve_device(config.train.device)
    if device.type != "cuda":
        raise TestbedError("largest_micro_batch needs a CUDA device; on a CPU memory is not the limit")
    candidates = [m for m in range(1, limit + 1) if divisor_of is None or divisor_of % m == 0]
    best = largest_fitting(candidates, lambda micro: fits(config, micro, device))
    if best is None:
        raise TestbedError("even a micro-batch of 1 sequence does not fit; set "
                           "train.activation_checkpointing=true, shorten data.seq_len or use train.parallel=fsdp")
    return best


def largest_fitting(candidates: list[int], fits_at) -> int | None:
    """The largest of the ascending candidates for which fits_at holds (assumed monotone):
    exponential steps from the smallest, then bisection; O(log n) probes."""
    if not candidates or not fits_at(candidates[0]):
        return None
    lo, hi, step = 0, len(candidates), 1  # candidates[lo] fits; candidates[hi] does not (or is past the end)
    while lo + step < hi:
        if fits_at(candidates[lo + step]):
            lo, step = lo + step, step * 2
        else:
            hi = lo + step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits_at(candidates[mid]) else (lo, mid)
    return candidates[lo]
