"""Distributed set-up and teardown, and the state that crosses processes (torchrun: DDP or FSDP2).

One process (WORLD_SIZE unset) needs none of it: every helper is then a no-op, so the trainer
reads the same on a laptop and on a cluster. Rank 0 writes the run directory; FSDP2 shards each
block, and checkpoints always hold the full, unsharded state keyed by parameter position.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import socket
from typing import Any

import torch

from testbed import exits
from testbed.config import Config
from testbed.errors import TestbedError


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    hosts: list[str] = dataclasses.field(default_factory=lambda: [socket.gethostname()])  # by rank

    @property
    def main(self) -> bool:
        return self.rank == 0


class PeerLost(TestbedError):
    """A collective failed: another rank died (killed, out of memory, its node lost) or stopped
    answering for train.collective_timeout_s. Nothing of this process is at fault and the run
    resumes exactly from its last checkpoint, so it exits PREEMPTED (run it again), and the
    registry bounds how often (testbed/sweep/outcome.py)."""

    exit_code = exits.PREEMPTED


def init_distributed(device_name: str, timeout_s: float) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_name != "cpu" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    exits.skip_finalization()
    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)), hosts=hosts)


def gather_floats(value: float, d: Dist) -> list[float]:
    """Every rank's `value`, by rank."""
    if d.world == 1:
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * d.world
    dist.all_gather_object(values, value)
    return [float(v) for v in values]


def any_rank(flag: bool, d: Dist) -> bool:
    """Whether `flag` holds on any rank. A stop (SIGTERM, SIGUSR1) reaches the ranks of a
    multi-node run at different steps; they must agree on the step they save at, or one waits in
    a checkpoint barrier while the others wait in the next step's gradient all-reduce."""
    if d.world == 1:
        return flag
    import torch.distributed as dist

    box = torch.tensor([int(flag)], device=torch.device("cuda", d.local_rank)
                       if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def brief(err: BaseException) -> str:
    """A collective's error in a few words: gloo's first sentence, without its source location."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". ")[0][:160]


def is_peer_failure(err: BaseException, d: Dist) -> bool:
    """A failed collective, as opposed to a fault of this rank. torch raises DistError (and its
    subclasses) for NCCL and store failures; gloo raises a plain RuntimeError whose message
    names its transport (a reset connection, or a timeout waiting for a peer)."""
    if d.world == 1:
        return False
    import torch.distributed as dist

    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and "gloo/transport" in str(err)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: Any, d: Dist) -> Any:
    if d.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(model: torch.nn.Module, config: Config, device: torch.device, d: Dist) -> torch.nn.Module:
    if d.world == 1:
        return model
    if config.train.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def full_model_state(model: torch.nn.Module, config: Config, d: Dist) -> dict[str, torch.Tensor]:
    if d.world > 1 and config.train.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    inner = model.module if hasattr(model, "module") else model
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}


def full_optim_state(model, optimizer, config: Config, d: Dist) -> dict:
    if d.world > 1 and config.train.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        sd = get_optimizer_state_dict(model, optimizer,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return to_index_keyed(sd, model)
    return optimizer.state_dict()


def to_index_keyed(sd: dict, model) -> dict:
    """FSDP's full optimiser state is keyed by parameter name; checkpoints key by position."""
    if "state" not in sd:  # ranks other than 0 receive nothing with cpu_offload; they do not save
        return {}
    names = [n for n, _ in (model.module if hasattr(model, "module") else model).named_parameters()]
    pos = {n: i for i, n in enumerate(names)}
    state = {pos[k]: v for k, v in sd["state"].items()}
    groups = []
    for g in sd["param_groups"]:
        g = dict(g)
        g["params"] = [pos[p] if isinstance(p, str) else p for p in g["params"]]
        groups.append(g)
    return {"state": state, "param_groups": groups}


def load_optim_state(model, optimizer, sd: dict, config: Config, d: Dist) -> None:
    if d.world > 1 and config.train.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = [n for n, _ in model.named_parameters()]
        named = {"state": {names[int(i)]: v for i, v in sd["state"].items()},
                 "param_groups": [dict(g, params=[names[int(p)] for p in g["params"]])
                                  for g in sd["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, named,
                                 options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(sd)


def load_model_state(model, state: dict[str, torch.Tensor], config: Config, d: Dist) -> None:
    inner = model.module if hasattr(model, "module") else model
    if d.world > 1 and config.train.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    missing, unexpected = inner.load_state_dict(state, strict=False)
    # A tied head is saved once (under the embedding's name); anything else missing is an error.
    missing = [k for k in missing if not (k == "head.weight" and inner.cfg.tie_embeddings)]
    if missing or unexpected:
        raise TestbedError(f"checkpoint does not match the model: missing {missing}, unexpected "
                           f"{unexpected}; resume with the config the run was started with")


def teardown(wait: bool = True) -> None:
    """Leave the process group, if any. The barrier first: without it gloo ranks sometimes abort
    at exit after training correctly. wait=False after a failure: the other ranks may never
    reach a barrier."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()
