"""Build the next step's batch in a background thread while the device trains on this one.

A batch is a pure function of its step (testbed/data/loader.py), so reading ahead cannot change
what a run sees. On CUDA the batch is put in page-locked (pinned) memory in the thread, so the
main thread's copy to the GPU is asynchronous and the step never waits on the host.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch


class Prefetcher:
    """threaded (default: on CUDA only): on a CPU the training step already keeps every core
    busy, and a reader thread beside it slows the step's thread pool more than it saves."""

    def __init__(self, plan, rank: int, world: int, device: torch.device, threaded: bool | None = None):
        self.plan, self.rank, self.world, self.device = plan, rank, world, device
        self.pin = device.type == "cuda"
        threaded = device.type == "cuda" if threaded is None else threaded
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if threaded else None
        self.pending: tuple[int, Future] | None = None

    def _load(self, step: int) -> torch.Tensor:
        batch = torch.from_numpy(self.plan.batch_tokens(step, self.rank, self.world))
        return batch.pin_memory() if self.pin else batch

    def get(self, step: int, next_step: int | None) -> torch.Tensor:
        """The batch of `step` on the device; starts reading `next_step` (None: nothing more)."""
        if self.pending is not None and self.pending[0] == step:
            host = self.pending[1].result()  # re-raises a data error from the thread
        else:
            host = self._load(step)
        if self.pool is not None and next_step is not None:
            self.pending = (next_step, self.pool.submit(self._load, next_step))
        else:
            self.pending = None
        return host.to(self.device, non_blocking=True)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending = None
