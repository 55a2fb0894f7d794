"""The trainer: one run, one process or many (torchrun: DDP or FSDP2).

    train(config, run_dir)   -> trains, validates, checkpoints, logs; resumes when asked

`Trainer.run` reads as the steps it takes: set up the process and the run directory, build data
and model, restore a checkpoint, parallelise, open the run directory for writing, then one
training step at a time, each followed by what falls due (log, evaluate, save, stop when
preempted), and finish. The process's exit status follows testbed/exits.py; run-directory
files go through testbed/rundir.py; distributed plumbing is in distributed.py and the decision
to resume in resume.py.
"""

from __future__ import annotations

import math
import os
import socket
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from testbed import exits
from testbed.config import Config, ModelConfig, run_id
from testbed.data import loader as data_loader
from testbed.data.tasks import TaskRows, load_tasks
from testbed.errors import TestbedError
from testbed.model.counting import flops_per_token
from testbed.model.transformer import Transformer
from testbed.optim import build_optimizer
from testbed.plan import describe, resolved_model, run_schedule
from testbed.rundir import RunDir, RunDirBusy, RunLock, StorageError
from testbed.schedules import Schedule
from testbed.train import checkpoint as ckpt
from testbed.train import device as dev
from testbed.train.distributed import (
    Dist,
    PeerLost,
    all_reduce_sum,
    any_rank,
    barrier,
    brief,
    broadcast_object,
    full_model_state,
    full_optim_state,
    gather_floats,
    init_distributed,
    is_peer_failure,
    load_model_state,
    load_optim_state,
    wrap_model,
)
from testbed.train.ema import WeightEMA
from testbed.train.metrics import MetricsLog
from testbed.train.monitor import Diverged, LossWatch, Window, significant, squared_norms
from testbed.train.prefetch import Prefetcher
from testbed.train.resume import Preemption, announce, load_run_config, prepare_run_dir, restore_rng, rng_state
from testbed.train.tasks import evaluate_tasks, summary_line

__all__ = ["NonFiniteLoss", "Trainer", "load_run_config", "train"]


# Optimiser hyperparameters the config sets; on restore they win over the checkpoint's.
CONFIG_HYPERPARAMS = ("betas", "weight_decay", "eps", "lr_scale")


class NonFiniteLoss(TestbedError):
    pass



def check_writable(path: Path, what: str = "--run-dir") -> None:
    """`path` can be a folder we write to: refused when it (or a parent) is a file or when its
    nearest existing folder is not writable (a read-only filesystem). Writes nothing."""
    folder = next(p for p in (path, *path.parents) if p.exists())
    if not folder.is_dir():
        raise TestbedError(f"{what} {str(path)!r}: {str(folder)!r} is a file, not a folder; "
                           f"choose another {what} or move the file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TestbedError(f"{what} {str(path)!r}: {str(folder)!r} is not writable (read-only "
                           f"filesystem or permissions); choose a {what} on a writable disk")


def make_run_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TestbedError(f"--run-dir {str(path)!r} cannot be created ({err.strerror or err}); "
                           f"choose a --run-dir on a writable disk") from None


def train(config: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          init_from: dict | None = None, parent: dict | None = None,
          prefix_metrics: list[dict] | None = None) -> dict:
    """Train one run into run_dir. Returns a summary dict (also written into run.json).

    init_from: a loaded checkpoint to start from (cooldown branches); parent: recorded in run.json;
    prefix_metrics: metric lines shared with the parent, written first."""
    # Listen for SIGTERM/SIGUSR1 from the very start: a signal during start-up is honoured at
    # the first step boundary instead of killing the process with no resume point.
    with Preemption() as preempt:
        trainer = Trainer(config, run_dir, preempt, resume=resume, overwrite=overwrite,
                          init_from=init_from, parent=parent, prefix_metrics=prefix_metrics)
        try:
            return trainer.run()
        finally:
            trainer.release()


def science_steps(config: Config, total_steps: int) -> set[int]:
    """The steps whose checkpoints are kept for fitting."""
    c, gbt = config.checkpoint, config.train.global_batch_tokens
    steps: set[int] = set()
    if c.every:
        steps.update(range(c.every, total_steps + 1, c.every))
    if c.log_spaced:
        steps.update(int(s) for s in np.unique(np.round(np.geomspace(1, total_steps, c.log_spaced))))
    for tokens in c.at_tokens:
        steps.add(min(total_steps, max(1, math.ceil(tokens / gbt))))
    return {s for s in steps if 1 <= s <= total_steps}


@torch.no_grad()
def evaluate(model: torch.nn.Module, source, val_ids: np.ndarray, micro: int, device, dtype,
             d: Dist, optimum_nats: float | None) -> dict[str, float]:
    """Validation loss (nats/token), bits per token and per byte on the fixed validation set; for
    a source with `validation_groups` (a mixture), each group's and their weighted means."""
    model.eval()
    groups = source.validation_groups() if hasattr(source, "validation_groups") else None
    if groups is not None:
        out = _grouped_validation(model, source, groups, micro, device, dtype, d)
        model.train()
        return out
    nats = _validation_nats(model, source, val_ids, micro, device, dtype, d)
    model.train()
    n_tokens = len(val_ids) * source.seq_len
    n_bytes = int(source.window_bytes(val_ids, data_loader.VALIDATION).sum())
    out = {"val_loss": nats / n_tokens, "val_bits_per_token": nats / n_tokens / math.log(2),
           "val_bpb": nats / (math.log(2) * n_bytes)}
    if optimum_nats is not None:
        out["val_opt_loss"] = optimum_nats / n_tokens
        out["val_excess_loss"] = out["val_loss"] - out["val_opt_loss"]
    return out


def _validation_nats(model: torch.nn.Module, source, val_ids: np.ndarray, micro: int, device, dtype,
                     d: Dist) -> float:
    """Summed target nats of the windows val_ids (each process takes every world-th)."""
    mine = val_ids[d.rank::d.world]
    nats = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(mine), micro):
        windows = torch.from_numpy(source.windows(mine[i:i + micro], data_loader.VALIDATION)).to(device)
        with dev.autocast(device, dtype):
            nats += model(windows[:, :-1], windows[:, 1:], reduction="sum").double()
    return all_reduce_sum(nats, d).item()


def _grouped_validation(model: torch.nn.Module, source, groups: dict, micro: int, device, dtype,
                        d: Dist) -> dict[str, float]:
    """source/NAME/val_loss and val_bpb per group; val_loss = sum_i w_i L_i, val_bpb = the
    weighted nats per token over ln 2 times the weighted bytes per token (docs/data.md, "Mixtures")."""
    out: dict[str, float] = {}
    loss = per_token_bytes = 0.0
    for name, (weight, ids) in groups.items():
        nats = _validation_nats(model, source, ids, micro, device, dtype, d)
        n_tokens = len(ids) * source.seq_len
        n_bytes = int(source.window_bytes(ids, data_loader.VALIDATION).sum())
        out[f"source/{name}/val_loss"] = nats / n_tokens
        out[f"source/{name}/val_bpb"] = nats / (math.log(2) * n_bytes)
        loss += weight * nats / n_tokens
        per_token_bytes += weight * n_bytes / n_tokens
    return {"val_loss": loss, "val_bits_per_token": loss / math.log(2),
            "val_bpb": loss / (math.log(2) * per_token_bytes), **out}


def auto_micro_batch(config: Config, device: torch.device, local_seqs: int, d: Dist) -> int:
    """All of a process's sequences in one pass on a CPU; on CUDA the largest divisor of them
    whose training step fits in memory (probed once, before the model is built)."""
    if device.type != "cuda":
        return local_seqs
    from testbed.train.memory import largest_micro_batch

    micro = largest_micro_batch(config, limit=local_seqs, divisor_of=local_seqs) if d.main else None
    micro = broadcast_object(micro, d)
    torch.cuda.reset_peak_memory_stats(device)
    return micro


class Trainer:
    """One run's training. Its state, declared here in one place: what __init__ sets, then what
    each stage of `run` adds (set_up, build, restore, parallelize, open_run_dir, train_loop)."""

    # --- from the caller (__init__)
    t_start: float  # perf_counter at construction: the wall clock of the run starts here
    config: Config
    run_dir: RunDir
    preempt: Preemption  # the stop-signal flag (SIGTERM / SIGUSR1)
    resume: bool  # --resume: continue the run in run_dir
    overwrite: bool  # --overwrite: restart the run in run_dir from scratch
    loaded: dict[str, Any] | None  # the checkpoint restored from (a branch's start, or this run's newest)
    parent: dict | None  # the parent run a branch records in run.json
    prefix_metrics: list[dict] | None  # metric lines shared with the parent, written first
    timing: dict[str, float]  # seconds spent training, evaluating, checkpointing, compiling
    restore_s: float  # seconds spent restoring weights and optimiser state
    last_eval: dict[str, float]  # the latest validation (and task) metrics
    last_eval_step: int  # the step of last_eval; -1 before the first
    watch: LossWatch  # loss spikes and divergence
    log_stats: dict  # gradient and update norms of the last logging step
    start_step: int  # the step training starts (or resumes) at
    done: int  # steps completed so far
    resumed_from: str | None  # the checkpoint folder resumed from
    exit_code: int  # the process's exit status (testbed/exits.py)
    state_msg: tuple[str, str]  # the final status and its message
    owner: RunLock | None  # rank 0's hold on the run directory
    owned: bool  # whether the ranks went through own_run_dir
    ema: WeightEMA | None  # the moving average of the weights (train.ema_decay)

    # --- set_up: the process
    d: Dist  # rank, world size, hosts
    device: torch.device
    dtype: torch.dtype  # the autocast precision

    # --- build: the plan, the data, the model
    info: dict[str, Any]  # testbed.plan.describe: planned steps, parameters, tokens, ...
    model_cfg: ModelConfig  # the model config with derived fields resolved
    total_steps: int  # the planned number of optimiser steps
    schedule: Schedule  # the learning-rate schedule
    gbt: int  # global batch size in tokens
    micro: int  # sequences per micro-batch (per process)
    accum: int  # micro-batches per step (gradient accumulation)
    source: Any  # the window source (data/loader.py: SyntheticSource, ShardSource, RandomSource)
    plan: data_loader.BatchPlan  # which windows make up each step's batch
    val_ids: np.ndarray  # the validation windows' indices
    tasks: list[TaskRows]  # downstream tasks scored at each evaluation
    optimum: float | None  # the data's optimal nats over the validation set (synthetic data only)
    base_model: Transformer  # the unwrapped model
    fpt: int  # training FLOPs per token

    # --- parallelize: compiling, wrapping, the optimiser
    compiled: bool  # whether the blocks (or, with graphs, the whole forward) are compiled
    graphs: bool  # whether the training forward and backward are captured whole (train.cuda_graphs)
    warm_steps: int  # a process's first steps, which compile (and record the graphs): timed apart
    model: torch.nn.Module  # base_model wrapped for DDP / FSDP2 (itself on one process)
    optimizer: torch.optim.Optimizer
    layer_params: list[list[torch.nn.Parameter]]  # parameters grouped by block, for per-layer norms
    peak: float | None  # the device's peak FLOP/s at dtype, for MFU
    peak_name: str  # where `peak` comes from

    # --- open_run_dir: the run directory's writers
    run_id: str
    metrics: MetricsLog  # metrics.jsonl (and wandb)
    window: Window  # the train-loss and throughput window between log lines

    # --- train_loop: the steps
    science: set[int]  # the steps whose checkpoints are kept for fitting
    progress: Any  # the tqdm progress bar (rank 0 with logging.progress), else None
    t_startup: float  # seconds from construction to the first step
    prefetch: Prefetcher  # the batches, loaded ahead
    lr: float  # the learning rate of the current step
    grad_norm: torch.Tensor  # the global gradient norm of the current step (before clipping)

    def __init__(self, config: Config, run_dir: str | Path, preempt: Preemption, *, resume: bool = False,
                 overwrite: bool = False, init_from: dict | None = None, parent: dict | None = None,
                 prefix_metrics: list[dict] | None = None):
        self.t_start = time.perf_counter()
        self.config = config
        self.run_dir = RunDir(run_dir)
        self.preempt = preempt
        self.resume, self.overwrite = resume, overwrite
        self.loaded = init_from
        self.parent, self.prefix_metrics = parent, prefix_metrics
        self.timing = {"train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0, "compile_s": 0.0}
        self.restore_s = 0.0
        self.last_eval = {}
        self.last_eval_step = -1
        self.watch = LossWatch(config.train.spike_nats, config.train.divergence_nats)
        self.log_stats = {}
        self.start_step = self.done = 0
        self.resumed_from = None
        self.exit_code, self.state_msg = exits.DONE, ("done", "finished")
        self.owner = None
        self.owned = False
        self.ema = None

    # ------------------------------------------------------------------ the run, step by step

    def run(self) -> dict:
        mode = self.set_up()
        if mode == "done":
            if self.d.main:
                print(f"{self.run_dir.path}: already finished; nothing to do")
            return (self.run_dir.read_run() or {}).get("summary", {})
        self.build()
        mode = self.restore(mode)
        self.parallelize()
        with self.failing_on_storage():
            self.open_run_dir(mode)
        self.train_loop()
        with self.failing_on_storage():
            return self.finish()

    def set_up(self) -> str:
        """Device, process group, precision, and what the run directory asks for."""
        self.d = init_distributed(self.config.train.device, self.config.train.collective_timeout_s)
        self.device = dev.resolve_device(self.config.train.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = dev.resolve_precision(self.config.train.precision, self.device)
        check_writable(self.run_dir.path)
        if self.run_dir.path.is_dir():
            self.own_run_dir()  # before reading anything in it; a new directory is owned once made
        # Nothing is written (or, with --overwrite, deleted) before the plan, the data and the
        # model are known to work: open_run_dir does that.
        if self.overwrite and (self.run_dir.exists() or ckpt.list_checkpoints(self.run_dir.path)):
            return "fresh"
        return prepare_run_dir(self.config, self.run_dir.path, self.resume, False, self.d)

    def own_run_dir(self) -> None:
        """Take the run directory's lock before reading or writing anything in it: one live
        process trains a run at a time (a double launch, a requeue beside a lingering process,
        an executor's orphan). Only rank 0 holds it; the other ranks share the directory and
        leave with the same error when it is busy."""
        busy = None
        if self.d.main:
            try:
                self.owner = self.run_dir.acquire()
            except RunDirBusy as err:
                busy = (str(err), err.holder)
        busy = broadcast_object(busy, self.d)
        if busy is not None:
            raise RunDirBusy(*busy)
        self.owned = True

    def release(self) -> None:
        """Give up the run directory (the end of the process does it too)."""
        if self.owner is not None:
            self.owner.release()
            self.owner = None

    def build(self) -> None:
        """The plan (steps, schedule, batch split), the data and the model."""
        config, d = self.config, self.d
        self.info = describe(config)
        self.model_cfg = resolved_model(config)
        self.total_steps = self.info["planned_steps"]
        self.schedule = run_schedule(config, self.total_steps)  # validated here, once
        self.gbt = config.train.global_batch_tokens
        global_seqs = self.gbt // config.data.seq_len
        if global_seqs % d.world:
            raise TestbedError(f"train.global_batch_tokens={self.gbt} gives {global_seqs} sequences, not "
                               f"divisible by the {d.world} processes; choose a batch that splits evenly")
        local_seqs = global_seqs // d.world
        self.micro = config.train.micro_batch_size or auto_micro_batch(config, self.device, local_seqs, d)
        if local_seqs % self.micro:
            raise TestbedError(f"train.micro_batch_size={self.micro} does not divide the {local_seqs} "
                               f"sequences each process takes per step; choose a divisor of {local_seqs}")
        self.accum = local_seqs // self.micro

        self.source = data_loader.make_source(config)
        self.plan = data_loader.BatchPlan(self.source, global_seqs, config.data.seed, config.data.unique_tokens,
                                          self.total_steps)
        self.val_ids = data_loader.validation_windows(self.source, config.data.val_sequences)
        self.tasks = load_tasks(config.train.tasks, self.source, config.data.seq_len)
        self.optimum = None
        if getattr(self.source, "has_optimum", False):
            windows = self.source.windows(self.val_ids, data_loader.VALIDATION)
            self.optimum = float(self.source.optimal_nats(windows).sum())

        torch.manual_seed(config.train.seed)
        if config.train.deterministic and self.device.type == "cuda":
            # CPU kernels are already deterministic (and this call costs ~1.7 s of imports).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.base_model = Transformer(self.model_cfg).to(self.device)
        self.base_model.activation_checkpointing = config.train.activation_checkpointing
        self.fpt = flops_per_token(self.model_cfg, config.data.seq_len)

    def restore(self, mode: str) -> str:
        """Weights, step and generator states from the newest valid checkpoint (or a branch's
        starting checkpoint); 'fresh' when an interrupted run never saved one."""
        t0 = time.perf_counter()
        if mode == "resume":
            folder = ckpt.latest_valid(self.run_dir.path)
            if folder is None:
                if any(ckpt.list_checkpoints(self.run_dir.path)):
                    raise TestbedError(f"run directory {str(self.run_dir.path)!r} holds an unfinished run "
                                       f"whose checkpoints are all damaged; pass --overwrite to restart it "
                                       f"from scratch")
                mode = "fresh"  # interrupted before its first checkpoint: nothing to resume from
            else:
                self.loaded = ckpt.load(folder)
                self.resumed_from = str(folder)
        if self.loaded is not None:
            load_model_state(self.base_model, self.loaded["model"], self.config, Dist())
            self.start_step = self.done = int(self.loaded["state"]["step"])
            self.watch.restore(self.loaded["state"])
            restore_rng(self.loaded["rng"], self.device)
        self.restore_s += time.perf_counter() - t0
        return mode

    def parallelize(self) -> None:
        """Compile, wrap for DDP/FSDP2, build the optimiser and restore its state."""
        self.start_ema()
        train = self.config.train
        self.compiled = dev.use_compile(train.compile, self.device) or bool(train.cuda_graphs)
        params = sum(p.numel() for p in self.base_model.parameters())
        self.graphs = dev.use_graphs(train.cuda_graphs, self.device, self.d.world, params, self.compiled,
                                     train.activation_checkpointing)
        # The first step compiles; under graphs the second records them (reduce-overhead's
        # warm-up run, then the capture), and replays start at the third.
        self.warm_steps = 2 if self.graphs else 1 if self.compiled else 0
        if self.graphs:
            # A small model's step is mostly kernel launches: everything before the head, forward
            # and backward, compiled into CUDA graphs and replayed each step (on a CPU, the same
            # compile without graphs). The loss stays outside (the fused loss has its own kernel).
            self.base_model.graphed_hidden = torch.compile(self.base_model.hidden, mode="reduce-overhead",
                                                           dynamic=False)
            self.base_model.compile_loss = True
        elif self.compiled:
            # Regional compilation (as torchtitan does): every block shares one compiled graph, so
            # compiling takes seconds whatever the depth, and parameter names stay unchanged.
            for block in self.base_model.blocks:
                block.compile()
            self.base_model.compile_loss = True
        # The optimiser is built on the wrapped model: FSDP2 replaces parameters by sharded ones.
        self.model = wrap_model(self.base_model, self.config, self.device, self.d)
        self.optimizer = build_optimizer(self.model, self.config.optim, self.device)
        # Per-layer norms group the parameters by block (FSDP2 shards them in place).
        self.layer_params = [list(block.parameters()) for block in self.base_model.blocks]
        if self.loaded is not None:
            t0 = time.perf_counter()
            configured = [{k: g[k] for k in CONFIG_HYPERPARAMS if k in g} for g in self.optimizer.param_groups]
            load_optim_state(self.model, self.optimizer, self.loaded["optim"], self.config, self.d)
            # The config's hyperparameters win over the checkpoint's (a branch may change betas or
            # weight decay); the moments and step counts are the checkpoint's.
            for group, values in zip(self.optimizer.param_groups, configured):
                group.update(values)
            self.restore_s += time.perf_counter() - t0
        self.peak, self.peak_name = dev.peak_flops(self.device, self.dtype)

    def start_ema(self) -> None:
        """The moving average of the weights, from the restored one (a checkpoint of this run, or
        the parent's for a branch) or else from the weights training starts at. Made before the
        model is compiled or wrapped, so the average is a plain module."""
        decay = self.config.train.ema_decay
        if not decay:
            return
        if self.d.world > 1 and self.config.train.parallel == "fsdp":
            raise TestbedError(f"train.ema_decay={decay} needs the full weights on every process; with "
                               f"train.parallel=fsdp they are sharded: use train.parallel=ddp or turn "
                               f"train.ema_decay off")
        self.ema = WeightEMA(self.base_model, decay)
        saved = (self.loaded or {}).get("ema")
        if saved is not None:
            self.ema.load_state_dict({k: v.to(self.device) for k, v in saved.items()})

    def open_run_dir(self, mode: str) -> None:
        """Bring the run directory to the restored step and announce the run in it."""
        config, rd = self.config, self.run_dir
        if self.overwrite:
            prepare_run_dir(config, rd.path, self.resume, True, self.d)
        if self.d.main:
            make_run_dir(rd.path)
        barrier(self.d)
        if not self.owned:  # the directory is new: own it before the first write
            self.own_run_dir()
            # Another process may have made and started it while this one was building.
            if broadcast_object(mode == "fresh" and rd.exists() if self.d.main else None, self.d):
                raise TestbedError(f"run directory {str(rd.path)!r} was started by another process while "
                                   f"this one prepared; run the same command again to resume or accept it")
        self.run_id = run_id(config.to_dict())
        self.metrics = MetricsLog(rd.path, enabled=self.d.main)
        self.window = Window(self.device, self.timing)
        self.continue_log_window()
        if not self.d.main:
            return
        if mode == "resume":
            self.rewind_run_dir()
        else:
            rd.metrics_path.unlink(missing_ok=True)
            for line in self.prefix_metrics or []:
                self.metrics.log(line)
        val_tokens = len(self.val_ids) * config.data.seq_len
        rd.write_run({"run_id": self.run_id, "config": config.to_dict(), "labels": config.labels, **self.info,
                      "data_entropy": self.optimum / val_tokens if self.optimum is not None else None,
                      "data_fingerprint": self.source.fingerprint(), "parent": self.parent,
                      "world_size": self.d.world, "device": str(self.device),
                      "precision": str(self.dtype).replace("torch.", ""), "peak_flops": self.peak,
                      "compiled": "graphs" if self.graphs else "blocks" if self.compiled else "none",
                      "peak_flops_source": self.peak_name, "host": socket.gethostname(), "hosts": self.d.hosts})
        started = f"resumed from {self.resumed_from}" if self.resumed_from else "started"
        rd.write_status("running", step=self.start_step, message=started)
        self.log_line(f"{'resume from ' + self.resumed_from if self.resumed_from else 'start'} at step "
                      f"{self.start_step}/{self.total_steps} on {self.device} ({self.d.world} process(es), "
                      f"{self.dtype})")
        announce(rd, config, self.info, self.start_step, bool(self.resumed_from), self.device, self.dtype, self.d.world)
        if config.logging.wandb:
            self.metrics.start_wandb(config.logging.wandb_project, config.logging.wandb_mode, config.to_dict(),
                                     rd.path)

    def rewind_run_dir(self) -> None:
        """On resume: forget what was written after the restored checkpoint."""
        rd, step = self.run_dir, self.start_step
        self.metrics.truncate_after(step)
        ckpt.truncate_index(rd.path, step)
        for aside in ckpt.set_aside_newer(rd.path, step):
            self.log_line(f"damaged checkpoint moved aside to {aside}")
        orphans = ckpt.unindexed(rd.path, step)
        if orphans:
            # Complete folders without an index line (killed between a folder's rename and its
            # line, or the line lost with a cut or zero-filled tail): index them again, with the
            # evaluation the killed process logged at their step (null where it logged none).
            evals = {m.get("step"): m for m in rd.metrics() if "val_loss" in m}
            lines = rd.index()
            for folder in orphans:
                s = ckpt.step_of(folder)
                lines.append({**self.index_fields(s, evals.get(s, {})), "step": s,
                              "kind": (ckpt.read_state(folder) or {})["kind"], "path": f"checkpoints/{folder.name}"})
                self.log_line(f"checkpoint {folder} had no index line: indexed again")
            rd.write_index(sorted(lines, key=lambda line: line["step"]))

    def continue_log_window(self) -> None:
        """A resume between two train-loss lines continues that line's average, or the next
        line would differ from an uninterrupted run's. Only when it ends where this run's next
        line falls (train.log_every may change across a resume); each process takes its share."""
        window = (self.loaded or {}).get("state", {}).get("log_window")
        if window and window["steps"] and window["steps"] == self.start_step % self.config.train.log_every:
            shares, z_shares = window.get("rank_loss_sums"), window.get("rank_z_sums")
            if shares is not None and len(shares) == self.d.world:  # as many ranks: each its own
                self.window.loss_sum.fill_(shares[self.d.rank])
                self.window.z_sum.fill_(z_shares[self.d.rank] if z_shares else 0.0)
            else:
                self.window.loss_sum.fill_(window["loss_sum"] / self.d.world)
                self.window.z_sum.fill_((window.get("z_sum") or 0.0) / self.d.world)
            self.window.steps = int(window["steps"])

    def train_loop(self) -> None:
        config = self.config
        self.science = science_steps(config, self.total_steps)
        self.progress = None
        if self.d.main and config.logging.progress:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=self.total_steps, initial=self.start_step, desc=self.run_id, unit="step",
                                 mininterval=1.0, dynamic_ncols=True, leave=False)
        self.model.train()
        self.t_startup = time.perf_counter() - self.t_start
        self.window.restart()
        self.prefetch = Prefetcher(self.plan, self.d.rank, self.d.world, self.device)
        try:
            for step in range(self.start_step, self.total_steps):
                self.train_step(step)
                if self.after_step():
                    break
            else:
                self.end_of_run()
        except BaseException as err:
            if is_peer_failure(err, self.d):
                lost = PeerLost(f"lost a peer process at step {self.done} ({brief(err)}); started again, "
                                f"the run resumes from its last checkpoint")
                self.fail(lost)
                raise lost from err
            self.fail(err)
            raise
        finally:
            self.prefetch.close()
            if self.progress is not None:
                self.progress.close()

    def end_of_run(self) -> None:
        """The last step's validation and final checkpoint. A process killed after them (before
        status.json said done) resumes at the last step: it takes that validation from the log
        instead of running and logging it twice, and saves the final checkpoint only if missing."""
        total, config = self.total_steps, self.config
        if self.start_step == total and self.loaded is not None:
            logged = [m for m in self.run_dir.metrics() if m.get("step") == total and "val_loss" in m] \
                if self.d.main else []
            logged = broadcast_object(logged[-1] if logged else None, self.d)
            if logged is not None:
                self.last_eval = {k: v for k, v in logged.items() if k.startswith(("val_", "task/"))}
                self.last_eval_step = total
            if config.checkpoint.final and self.loaded["state"].get("kind") == "final":
                self.evaluate(total)  # a no-op when the log had it
                return
        if config.checkpoint.final:
            self.save(total, "final")
        else:
            self.evaluate(total)

    def train_step(self, step: int) -> None:
        """One optimiser step: `accum` micro-batches forward and backward, clip, update."""
        config, model, micro = self.config, self.model, self.micro
        t_step = time.perf_counter()
        self.lr = self.schedule.lr(step, self.total_steps, config.optim.lr, self.gbt)
        for group in self.optimizer.param_groups:
            # A group's lr_scale (µP's 1/m for hidden matrices, testbed/optim.py) rides on the schedule.
            group["lr"] = self.lr * group["lr_scale"] if "lr_scale" in group else self.lr
        batch = self.prefetch.get(step, step + 1 if step + 1 < self.total_steps else None)
        # Norms beyond the global gradient norm are read on logging steps only (each costs a sync).
        log_now = (step + 1) % config.train.log_every == 0 or step + 1 == self.total_steps
        z_weight = config.optim.z_loss
        step_loss = torch.zeros((), device=self.device)
        for k in range(self.accum):
            mb = batch[k * micro:(k + 1) * micro]
            sync = nullcontext()
            if self.d.world > 1 and k < self.accum - 1 and hasattr(model, "no_sync"):
                sync = model.no_sync()  # DDP: all-reduce gradients once, after the last micro-batch
            with sync:
                if self.graphs:
                    # The previous replay's outputs (its loss is already summed) may be overwritten.
                    torch.compiler.cudagraph_mark_step_begin()
                with dev.autocast(self.device, self.dtype):
                    if z_weight:
                        objective, loss, z_term = model(mb[:, :-1], mb[:, 1:], z_loss=z_weight)
                        self.window.z_sum += z_weight * z_term / self.accum
                    else:
                        objective = loss = model(mb[:, :-1], mb[:, 1:])
                (objective / self.accum).backward()
            step_loss += loss.detach() / self.accum
        if log_now:
            layer_grads = squared_norms([[p.grad for p in ps] for ps in self.layer_params], self.device)
        clip = config.optim.grad_clip
        self.grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        # Reading the loss on the host waits for the GPU: there, only on logging steps.
        if (self.device.type == "cpu" or log_now) and not torch.isfinite(step_loss).item():
            raise NonFiniteLoss(
                f"the training loss became {step_loss.item()} at step {step + 1}; the last good "
                f"checkpoint is kept. Lower optim.lr (now {config.optim.lr}) or raise warmup")
        if log_now:
            # A copy of the weights (on logging steps only), to measure the update by.
            before = {p: p.detach().clone() for p in model.parameters() if p.requires_grad}
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        if log_now:
            self.log_stats = self.norm_stats(layer_grads, before)
        self.optimizer.zero_grad(set_to_none=True)
        self.done = step + 1
        self.window.loss_sum += step_loss
        self.window.steps += 1
        self.window.tokens += self.gbt
        if step < self.start_step + self.warm_steps:
            # A process's first steps compile (and record the graphs): time them apart and start
            # the throughput window after them, so tokens_per_s is the steady-state speed.
            dev.synchronize(self.device)
            self.timing["compile_s"] += time.perf_counter() - t_step
            self.window.restart()
        else:
            self.timing["train_s"] += time.perf_counter() - t_step
        if self.progress is not None:
            self.progress.update(1)

    def norm_stats(self, layer_grads: torch.Tensor, before: dict[torch.Tensor, torch.Tensor]) -> dict:
        """Per-block gradient norms (before clipping) and the norms of this step's parameter
        update (global and per block), for the train line; one host sync."""
        for p, b in before.items():
            b.sub_(p)  # in place: the copy becomes minus the update, with no second copy of the weights
        layer_updates = squared_norms([[before[p] for p in ps] for ps in self.layer_params], self.device)
        total_update = squared_norms([list(before.values())], self.device)
        sq = torch.cat([layer_grads, layer_updates, total_update])
        if self.d.world > 1 and self.config.train.parallel == "fsdp":
            sq = all_reduce_sum(sq, self.d)  # each process holds a shard of every tensor
        norms = sq.sqrt().tolist()
        n = len(self.layer_params)
        return {"grad_norm_layers": significant(norms[:n]), "update_norm": norms[-1],
                "update_norm_layers": significant(norms[n:2 * n])}

    def after_step(self) -> bool:
        """What falls due after a step: log, evaluate, save; True to stop (preempted)."""
        config, done = self.config, self.done
        final = done == self.total_steps
        if done % config.train.log_every == 0 or final:
            self.log_train()
        if done % config.train.eval_every == 0 or final:
            self.evaluate(done)
        rolling_every = config.checkpoint.rolling_every
        rolling_due = bool(rolling_every and done % rolling_every == 0)
        if done in self.science:
            self.save(done, "science")
        elif rolling_due and not final:
            self.save(done, "rolling")
        if self.stop_agreed(done % config.train.log_every == 0 or rolling_due or done in self.science) \
                and not final:
            if not rolling_due and done not in self.science:
                # Not validated: an uninterrupted run has no validation line at this step, and
                # the resumed run's log must read like it.
                self.save(done, "rolling", validate=False)
            self.exit_code = exits.PREEMPTED
            signal = self.preempt.requested or "a stop signal to another rank"
            self.state_msg = ("preempted", f"{signal} at step {done}; resume checkpoint saved")
            return True
        if self.window.steps == 0:
            self.window.restart()
        return False

    def stop_agreed(self, due: bool) -> bool:
        """Whether to stop here for a signal. One process: at once. Several: only at logging and
        checkpoint steps, where the ranks already synchronise, so the step's hot path gains no
        collective; all ranks agree on the same step (a signal reaches nodes at different steps),
        at most train.log_every steps after it arrived."""
        if self.d.world == 1:
            return self.preempt.requested is not None
        return due and any_rank(self.preempt.requested is not None, self.d)

    def log_train(self) -> None:
        done, window = self.done, self.window
        mean_loss = all_reduce_sum(window.loss_sum.clone(), self.d).item() / self.d.world / window.steps
        extra: dict = {}
        if self.config.optim.z_loss:
            extra["z_loss"] = all_reduce_sum(window.z_sum.clone(), self.d).item() / self.d.world / window.steps
        dev.synchronize(self.device)
        tps = window.tokens_per_s()
        extra.update(self.watch.spike(mean_loss))
        if self.d.main:
            self.metrics.log({"step": done, "tokens": done * self.gbt, "flops": done * self.gbt * self.fpt,
                              "lr": self.lr, "train_loss": mean_loss, "grad_norm": self.grad_norm.item(),
                              "tokens_per_s": tps,
                              "mfu": tps * self.fpt / self.peak if self.peak and tps else None,
                              "peak_mem_gb": (dev.peak_memory_bytes(self.device) or 0) / 2**30,
                              "epoch": self.plan.epochs_at(done), **extra, **self.log_stats})
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{mean_loss:.3f}", refresh=False)
        window.loss_sum.zero_()
        window.z_sum.zero_()
        window.steps, window.tokens = 0, 0
        self.watch.check_divergence(done, mean_loss, self.schedule.warmup_steps, self.config.optim.lr)

    def evaluate(self, step: int) -> dict[str, float]:
        """The validation set at `step` (once per step, however many callers ask)."""
        if self.last_eval_step == step:
            return self.last_eval
        # Training kernels still queued on the GPU belong to the step time, not to validation.
        dev.synchronize(self.device)
        t0 = time.perf_counter()
        self.last_eval = evaluate(self.model, self.source, self.val_ids, self.micro, self.device, self.dtype,
                                  self.d, self.optimum)
        if self.ema is not None:
            # The same validation windows through the averaged weights: val_loss_ema, val_bpb_ema, ...
            averaged = evaluate(self.ema.model, self.source, self.val_ids, self.micro, self.device, self.dtype,
                                self.d, self.optimum)
            self.last_eval.update({f"{k}_ema": v for k, v in averaged.items() if k != "val_opt_loss"})
        # Tasks take the validation's batch in tokens (their rows are shorter than a window).
        scores = evaluate_tasks(self.model, self.tasks, self.micro * self.config.data.seq_len, self.device,
                                self.dtype, self.d)
        self.last_eval.update(scores)
        self.last_eval_step = step
        self.timing["eval_s"] += time.perf_counter() - t0
        if self.d.main:
            self.metrics.log({"step": step, "tokens": step * self.gbt, "flops": step * self.gbt * self.fpt,
                              "lr": self.lr_before(step), "epoch": self.plan.epochs_at(step), **self.last_eval})
            if self.ema is not None:  # the two side by side, for a reader of train.log
                ev = self.last_eval
                self.log_line(f"step {step}/{self.total_steps}: val_loss {ev['val_loss']:.4f}, val_bpb "
                              f"{ev['val_bpb']:.4f}; EMA val_loss {ev['val_loss_ema']:.4f}, val_bpb "
                              f"{ev['val_bpb_ema']:.4f}")
            if scores:
                self.log_line(f"step {step} tasks: {summary_line(scores)}")
        return self.last_eval

    def save(self, step: int, kind: str, validate: bool = True) -> None:
        """A checkpoint at `step`, after checking every weight is finite; validated (and the
        validation recorded in the index) unless `validate` is False."""
        config, d = self.config, self.d
        dev.synchronize(self.device)  # as in evaluate: queued training kernels are step time
        t0 = time.perf_counter()
        bad = torch.zeros((), device=self.device)
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2: this rank's shard
            bad += (~torch.isfinite(local.detach())).sum()
        if all_reduce_sum(bad, d).item():
            raise NonFiniteLoss(f"the weights became non-finite by step {step}; the last good checkpoint "
                                f"is kept. Lower optim.lr (now {config.optim.lr}) or raise warmup")
        eval_before = self.timing["eval_s"]
        ev = self.evaluate(step) if validate else (self.last_eval if self.last_eval_step == step else {})
        eval_inside = self.timing["eval_s"] - eval_before  # counted in eval_s, not again here
        model_state = full_model_state(self.model, config, d)
        optim_state = full_optim_state(self.model, self.optimizer, config, d)
        # Each rank's share as well as the total: resumed on as many ranks, each continues its
        # own, and the next logged mean sums the same numbers in the same order as without a stop.
        shares = gather_floats(self.window.loss_sum.item(), d)
        log_window: dict[str, Any] = {"loss_sum": math.fsum(shares), "steps": self.window.steps,
                                      "rank_loss_sums": shares}
        if config.optim.z_loss:
            z_shares = gather_floats(self.window.z_sum.item(), d)
            log_window.update(z_sum=math.fsum(z_shares), rank_z_sums=z_shares)
        if d.main:
            state = {"tokens": step * self.gbt, "total_steps": self.total_steps, "run_id": self.run_id,
                     "config": config.to_dict(), "world_size": d.world, **self.watch.state(),
                     "log_window": log_window}
            ckpt.save(self.run_dir.path, step, kind, model_state, optim_state, rng_state(self.device), state,
                      self.index_fields(step, ev), self.ema.state_dict() if self.ema is not None else None)
            ckpt.apply_retention(self.run_dir.path, config.checkpoint.keep_rolling)
        barrier(d)
        self.timing["checkpoint_s"] += time.perf_counter() - t0 - eval_inside

    def finish(self) -> dict:
        """The summary, into run.json; status done or preempted."""
        wall = time.perf_counter() - self.t_start
        state, message = self.state_msg
        summary = {"state": state, "steps": self.done, "planned_steps": self.total_steps, **self.last_eval,
                   "micro_batch_size": self.micro,
                   "timing": {"wall_s": wall, "startup_s": self.t_startup, "restore_s": self.restore_s,
                              **self.timing, "other_s": wall - self.t_startup - sum(self.timing.values())}}
        if self.d.main:
            run_json = self.run_dir.read_run()
            assert run_json is not None, "open_run_dir wrote run.json"
            run_json["summary"] = summary
            self.run_dir.write_run(run_json)
            self.run_dir.write_status(state, step=self.done, message=message)
            self.log_line(f"{state}: {message} (wall {wall:.1f}s)")
            self.metrics.finish(exit_code=0)
        summary["exit_code"] = self.exit_code
        barrier(self.d)
        return summary

    def fail(self, err: BaseException) -> None:
        if self.d.main:
            message = str(err) if isinstance(err, TestbedError) else f"{type(err).__name__}: {err}"
            # A lost peer is no fault of the run: the status says it may be started again.
            state, extra = ("preempted", {"lost_peer": True}) if isinstance(err, PeerLost) else ("failed", {})
            if isinstance(err, (NonFiniteLoss, Diverged)):
                # Its LR was too high: a measured outcome, which a study's LR bracket reads as such
                # (testbed.study.bracket), where any other failure stops the study.
                extra["diverged"] = True
            try:
                self.run_dir.write_status(state, step=self.done, message=message, **extra)
                self.log_line(f"{'stopped' if state == 'preempted' else 'failed'} at step {self.done}: {message}")
            except OSError:  # a full disk: the error itself is what the user needs to see
                pass
            self.metrics.finish(exit_code=1)

    @contextmanager
    def failing_on_storage(self):
        """Run-directory writes outside the training loop (announcing the run, its summary): a
        disk that refuses them fails the run as an error in the loop does, instead of leaving it
        "running" (write_status reuses the old file's blocks on a full disk)."""
        try:
            yield
        except StorageError as err:
            if self.owner is not None:  # the run directory is this process's to write
                self.fail(err)
            raise

    # ------------------------------------------------------------------ small helpers

    def lr_before(self, step: int) -> float:
        """The learning rate of the step that led to `step` (what a checkpoint at it records)."""
        return self.schedule.lr(max(step - 1, 0), self.total_steps, self.config.optim.lr, self.gbt)

    def index_fields(self, step: int, ev: dict) -> dict:
        fields = {"tokens": step * self.gbt, "flops": step * self.gbt * self.fpt, "val_loss": ev.get("val_loss"),
                  "val_bpb": ev.get("val_bpb"), "lr": self.lr_before(step),
                  "phase": self.schedule.phase(max(step - 1, 0), self.total_steps)}
        if self.ema is not None:
            fields.update(val_loss_ema=ev.get("val_loss_ema"), val_bpb_ema=ev.get("val_bpb_ema"))
        return fields

    def log_line(self, text: str) -> None:
        self.run_dir.log(text)
