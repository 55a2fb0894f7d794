"""Find the largest micro-batch that fits a config on the current device."""

from __future__ import annotations

import torch

from testbed.config import Config
from testbed.errors import TestbedError


def fits(config: Config, micro: int, device: torch.device) -> bool:
    """One real training step (forward, backward, optimiser) at this micro-batch."""
    from testbed.model.transformer import Transformer
    from testbed.train import device as dev
    from testbed.train.optim import build_optimizer
    from testbed.train.plan import resolved_model

    cfg = resolved_model(config)
    dtype = dev.resolve_precision(config.train.precision, device)
    model = optimizer = None
    try:
        model = Transformer(cfg).to(device)
        model.activation_checkpointing = config.train.activation_checkpointing
        optimizer = build_optimizer(model, config.optim, device)
        x = torch.randint(0, cfg.vocab_size, (micro, config.data.seq_len + 1), device=device)
        with dev.autocast(device, dtype):
            logits = model(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
        optimizer.step()
        dev.synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_micro_batch(config: Config, limit: int = 4096) -> int:
    """Double until a step no longer fits, then bisect. Needs a GPU (a CPU has no fixed limit)."""
    from testbed.train import device as dev

    device = dev.resolve_device(config.train.device)
    if device.type != "cuda":
        raise TestbedError("largest_micro_batch needs a CUDA device; on a CPU memory is not the limit")
    if not fits(config, 1, device):
        raise TestbedError("even a micro-batch of 1 sequence does not fit; set "
                           "train.activation_checkpointing=true, shorten data.seq_len or use train.parallel=fsdp")
    good, bad = 1, None
    while bad is None and good < limit:
        if fits(config, good * 2, device):
            good *= 2
        else:
            bad = good * 2
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(config, mid, device) else (good, mid)
    return good
