"""Distributed set-up and teardown, and the state that crosses processes (torchrun: DDP or FSDP2).

One process (WORLD_SIZE unset) needs none of it: every helper is then a no-op, so the trainer
reads the same on a laptop and on a cluster. Rank 0 writes the run directory; FSDP2 shards each
block, and checkpoints always hold the full, unsharded state keyed by parameter position.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from testbed.config import Config
from testbed.errors import TestbedError


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_name != "cpu" else "gloo"
        dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)))


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
