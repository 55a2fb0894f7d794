"""Base configs the built-in studies share, per size, and small helpers for their sweeps.

tiny: the built-in synthetic language (32 tokens, 16-token sequences), models of a few thousand
parameters; mechanics only, seconds per run. cpu: the Python standard library's source
(testbed/study/corpus.py, 8.8M training tokens), models of 50k-500k non-embedding parameters,
every study sized by `testbed study plan` to fit 30 min on 2 cores without repeating data it
does not mean to repeat. gpu: FineWeb-Edu's 10B-token sample (8B+ training tokens), models of
6M-100M non-embedding parameters on one H100; cost it with `testbed study plan NAME --size gpu`.
gpu-min: the studies CPU scale limits, at 1e16-3e16 training FLOPs within 8 minutes of one
H100/H200, on every Python source installed there (testbed/study/corpus.py, made on the machine
in a minute or two), models of 1M-6M non-embedding parameters.
"""

from __future__ import annotations

import copy
import math
from typing import Any

BATCH = {"tiny": 512, "cpu": 2048, "gpu": 65536, "gpu-min": 32768}
# What a size promises: its runs fit BUDGET_S seconds, each run costing its training FLOPs
# (6N + attention per token, testbed.model.counting) at `rate` plus RUN_OVERHEAD_S (start-up,
# the final validation and checkpoint). See docs/studies.md#cost.
BUDGET_S = {"tiny": 60, "cpu": 1800, "gpu": 8 * 3600, "gpu-min": 8 * 60}
# gpu-min: each run is a forked process that initialises CUDA, compiles (its models are under
# train.cuda_graphs' 50M parameters: the whole forward and backward, recorded into CUDA graphs;
# compiling blocks took 1.4-7.5 s for 124M-1B models on the H200, docs/gpu/, the whole-model
# compile is not yet measured), evaluates and checkpoints: 12 s assumed.
RUN_OVERHEAD_S = {"tiny": 2.0, "cpu": 4.0, "gpu": 60.0, "gpu-min": 12.0}
# Once per `study run`, before its first run: importing torch, starting the fork servers,
# validating every sweep. Corpus preparation is stated separately (`study plan` names it).
STARTUP_S = {"tiny": 0.0, "cpu": 0.0, "gpu": 0.0, "gpu-min": 30.0}
# Achieved fp32 training FLOP/s per unit of d_model on 2 AVX2 cores, measured with `testbed train`
# at seq 128, batch 2048 tokens, vocab 4096: d_model 32, 64, 96, 128 gave 18, 34, 46, 58 GFLOP/s
# (small matrices leave the cores idle), so the rate grows about linearly with width.
CPU_FLOPS_PER_WIDTH = 0.45e9
CPU_FLOPS_CAP = 60e9


# gpu-min, an assumption until measured: models this small reach far below an H100's data-sheet
# 989 TFLOP/s bf16 peak (the 124M rung reached 43% MFU on the H200 at seq 1024, docs/gpu/): 20%
# from d_model 512, 15% from 256, and below 256 falling with the width (small matrices and
# kernel launches leave the card idle), at seq 256 and 32k-token batches.
H100_PEAK = 989e12


def gpu_min_mfu(d_model: int) -> float:
    if d_model >= 512:
        return 0.20
    return 0.15 * min(1.0, d_model / 256)


def rate(size: str, d_model: int) -> float:
    """Achieved training FLOP/s of a study model of this width at this size: on the CPU the
    measured width dependence above; gpu-min the assumed MFU above; one H100 at 40% MFU; tiny
    as 1 GFLOP/s."""
    if size == "cpu":
        return min(CPU_FLOPS_CAP, CPU_FLOPS_PER_WIDTH * d_model)
    if size == "gpu-min":
        return gpu_min_mfu(d_model) * H100_PEAK
    return {"tiny": 1.0e9, "gpu": 0.4 * H100_PEAK}[size]
SEQ = {"tiny": 16, "cpu": 128, "gpu": 256, "gpu-min": 256}


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
    from testbed.study.corpus import VOCAB_SIZE, path_for

    # The gpu and gpu-min corpora are prepared on the GPU machine: stating their vocabulary lets
    # `study plan` cost the runs before then (cpu configs leave it to the prepared folder, as they
    # always have; `study plan` reads it from the folder's name until it is prepared).
    vocab = {"vocab_size": VOCAB_SIZE} if size in ("gpu", "gpu-min") else {}
    d_model, n_layers, n_heads = {"cpu": (64, 4, 2), "gpu-min": (256, 4, 4), "gpu": (512, 8, 8)}[size]
    return {
        "model": {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "max_seq_len": SEQ[size],
                  **vocab},
        "data": {"source": "shards", "path": str(path_for(size)), "seq_len": SEQ[size],
                 "val_sequences": 256},
        "optim": {"lr": 3.0e-3},
        "schedule": {"name": "cosine", "warmup_fraction": 0.05},
        "train": {"global_batch_tokens": BATCH[size], "eval_every": 10_000, "log_every": 50},
        "logging": {"wandb": False, "progress": False},
    }


def tiny_text(tree: dict[str, Any], vocab_size: int = 512, nested_in: int | None = None) -> dict[str, Any]:
    """A tiny tree on real text: the mini slice of the library corpus (400 kB, prepared in
    seconds) at 32-token sequences, for tiny studies whose mechanics need a loss that still falls
    with model size (the synthetic language's tiny runs sit at its entropy floor)."""
    from testbed.study.corpus import stdlib_path

    tree = copy.deepcopy(tree)
    tree["data"] = {"source": "shards", "path": str(stdlib_path(vocab_size, nested_in, mini=True)),
                    "seq_len": 32, "val_sequences": 128}
    tree["model"]["max_seq_len"] = 32
    return tree


# One nested BPE ladder per size (every smaller vocabulary's merges are a prefix of the largest's):
# the vocab study sweeps all of it, and chinchilla's cpu size reads its 512-token rung.
VOCAB_LADDER = {"tiny": [300, 384, 512], "cpu": [512, 1024, 2048, 4096, 8192],
                "gpu": [4096, 8192, 16384, 32768, 65536]}


def ladder_corpus(size: str, vocab: int) -> str:
    """The prepared folder of one rung of the size's vocabulary ladder."""
    from testbed.study.corpus import path_for

    return str(path_for(size, vocab, nested_in=max(VOCAB_LADDER[size])))


# The cpu studies' small vocabulary: on the 512-token rung of the BPE ladder the head is 11-20% of a
# small model's training FLOPs (the 4096-token base: up to half), so the blocks, which the claims
# are about, hold most of them.
SMALL_VOCAB = 512


def small_vocab_base(size: str, text_at_tiny: bool = False) -> dict[str, Any]:
    """The size's base config with, at cpu, the SMALL_VOCAB rung of the BPE ladder (its vocabulary
    stated, so `study plan` costs the runs before it is prepared); at tiny on real text
    (`tiny_text`) when `text_at_tiny`; gpu and gpu-min as `base` gives them."""
    tree = base(size)
    if size == "tiny" and text_at_tiny:
        tree = tiny_text(tree)
    if size == "cpu":
        tree["data"]["path"] = ladder_corpus(size, SMALL_VOCAB)
        tree["model"]["vocab_size"] = SMALL_VOCAB
    return tree


def with_schedule(tree: dict[str, Any], **schedule: Any) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    tree["schedule"] = {"warmup_fraction": 0.05, **schedule}
    return tree


def seeds(size: str) -> list[int]:
    """One seed for mechanics; two on the CPU and in gpu-min's 8 minutes; three on a GPU (the
    intervals come from them)."""
    return {"tiny": [0], "cpu": [0, 1], "gpu-min": [0, 1], "gpu": [0, 1, 2]}[size]


def width_for(n_non_embedding: float, layers: int, multiple: int) -> int:
    """d_model giving about `n_non_embedding` = 12 L d^2, rounded to `multiple`."""
    return max(multiple, int(round(math.sqrt(n_non_embedding / (12 * layers)) / multiple)) * multiple)
