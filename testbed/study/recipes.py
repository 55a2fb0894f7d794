"""Base configs the built-in studies share, per size, and small helpers for their sweeps.

tiny: the built-in synthetic language (32 tokens, 16-token sequences), models of a few thousand
parameters; mechanics only, seconds per run. cpu: the Python standard library's source
(testbed/study/corpus.py), models around 0.1-1M parameters, sized for <= 30 min on 2 cores.
gpu: the same corpus at ~10x the cpu models; cost it with `testbed sweep plan` first.
"""

from __future__ import annotations

import copy
import math
from typing import Any

BATCH = {"tiny": 512, "cpu": 4096, "gpu": 65536}
SEQ = {"tiny": 16, "cpu": 128, "gpu": 256}


def base(size: str) -> dict[str, Any]:
    if size == "tiny":
        return {
            "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 16},
            "data": {"source": "synthetic", "seq_len": 16, "val_sequences": 128,
                     "synthetic": {"vocab_size": 32, "lam": 0.5}},
            "optim": {"lr": 1.0e-2},
            "schedule": {"name": "cosine", "warmup_fraction": 0.05},
            "train": {"global_batch_tokens": BATCH[size], "eval_every": 1000, "log_every": 10},
            "logging": {"wandb": False, "progress": False},
        }
    from testbed.study.corpus import stdlib_path

    return {
        "model": {"d_model": 128 if size == "cpu" else 512, "n_layers": 4 if size == "cpu" else 8,
                  "n_heads": 4 if size == "cpu" else 8, "max_seq_len": SEQ[size]},
        "data": {"source": "shards", "path": str(stdlib_path()), "seq_len": SEQ[size],
                 "val_sequences": 256},
        "optim": {"lr": 3.0e-3},
        "schedule": {"name": "cosine", "warmup_fraction": 0.05},
        "train": {"global_batch_tokens": BATCH[size], "eval_every": 10_000, "log_every": 50},
        "logging": {"wandb": False, "progress": False},
    }


def with_schedule(tree: dict[str, Any], **schedule: Any) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    tree["schedule"] = {"warmup_fraction": 0.05, **schedule}
    return tree


def seeds(size: str) -> list[int]:
    """One seed for mechanics; two on the CPU; three on a GPU (the intervals come from them)."""
    return {"tiny": [0], "cpu": [0, 1], "gpu": [0, 1, 2]}[size]


def width_for(n_non_embedding: float, layers: int, multiple: int) -> int:
    """d_model giving about `n_non_embedding` = 12 L d^2, rounded to `multiple`."""
    return max(multiple, int(round(math.sqrt(n_non_embedding / (12 * layers)) / multiple)) * multiple)
