"""The training loop: one run, one process or many (torchrun: DDP or FSDP2).

    train(config, run_dir)   -> trains, validates, checkpoints, logs; resumes when asked

Contract with callers (sweeps, SLURM scripts), see docs/checkpoint.md:
    exit 0   the run is done (status.json state "done")
    exit 75  preempted: SIGTERM/SIGUSR1 arrived, a resume checkpoint was saved; requeue me
    exit 2   bad input (a TestbedError): do not retry
    other    failure (status.json state "failed" with the reason)
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from testbed import exits
from testbed.config import Config, saved_config
from testbed.data import loader as data_loader
from testbed.errors import TestbedError
from testbed.model.counting import flops_per_token
from testbed.model.transformer import Transformer
from testbed.rundir import RunDir, run_id
from testbed.train import checkpoint as ckpt
from testbed.train import device as dev
from testbed.train.metrics import MetricsLog
from testbed.train.distributed import (
    Dist,
    all_reduce_sum,
    barrier,
    broadcast_object,
    full_model_state,
    full_optim_state,
    init_distributed,
    load_model_state,
    load_optim_state,
    wrap_model,
)
from testbed.optim import build_optimizer
from testbed.plan import describe, resolved_model, run_schedule
from testbed.train.prefetch import Prefetcher

# Keys that may differ between an interrupted run and its resumption (they change no number).
RESUME_FREE_KEYS = ("logging", "train.device", "train.compile", "train.micro_batch_size", "train.parallel",
                    "train.eval_every", "train.log_every", "checkpoint")


class NonFiniteLoss(TestbedError):
    pass


# ----------------------------------------------------------------------------- helpers


def science_steps(config: Config, total_steps: int) -> set[int]:
    c, gbt = config.checkpoint, config.train.global_batch_tokens
    steps: set[int] = set()
    if c.every:
        steps.update(range(c.every, total_steps + 1, c.every))
    if c.log_spaced:
        steps.update(int(s) for s in np.unique(np.round(np.geomspace(1, total_steps, c.log_spaced))))
    for tokens in c.at_tokens:
        steps.add(min(total_steps, max(1, math.ceil(tokens / gbt))))
    return {s for s in steps if 1 <= s <= total_steps}


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        full = prefix + key
        if any(full == k or full.startswith(k + ".") for k in RESUME_FREE_KEYS):
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, full + ".")
        elif va != vb:
            out.append(f"{full}: {va!r} -> {vb!r}")
    return out


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop saves at the next step boundary and exits 75."""

    def __init__(self):
        self.requested: str | None = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread)
                pass
        return self

    def handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["torch_cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    """CPU and CUDA generators as saved; a CUDA state is skipped on a CPU (a resume that changes
    device is allowed: the batches are still exact, only dropout masks differ)."""
    if "torch_cpu" in rng:
        torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["torch_cuda"], device)


def auto_micro_batch(config: Config, device: torch.device, local_seqs: int, d: "Dist") -> int:
    """All of a process's sequences in one pass on a CPU; on CUDA the largest divisor of them
    whose training step fits in memory (probed once, before the model is built)."""
    if device.type != "cuda":
        return local_seqs
    from testbed.train.memory import largest_micro_batch

    micro = largest_micro_batch(config, limit=local_seqs, divisor_of=local_seqs) if d.main else None
    micro = broadcast_object(micro, d)
    torch.cuda.reset_peak_memory_stats(device)
    return micro


# ----------------------------------------------------------------------------- run directory


def prepare_run_dir(config: Config, run_dir: Path, resume: bool, overwrite: bool, d: Dist) -> str:
    """Decide what to do with RUN_DIR: 'fresh', 'resume' or 'done'. Never loses a finished run."""
    rd = RunDir(run_dir)
    status = rd.read_status()
    has_run = rd.exists()
    if overwrite and has_run:
        if d.main:
            for p in (rd.run_json, rd.status_json, rd.metrics_path, rd.log_path, rd.checkpoints, rd.path / "wandb"):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        barrier(d)
        return "fresh"
    if status.get("state") == "done":
        if resume:
            return "done"
        raise TestbedError(f"run directory {str(run_dir)!r} already holds a finished run; pass "
                           f"--overwrite to replace it, --resume to accept it, or choose another --run-dir")
    if has_run:
        saved = saved_config(rd.read_run()["config"]).to_dict()
        diffs = config_differences(saved, config.to_dict())
        if diffs:
            raise TestbedError(f"run directory {str(run_dir)!r} holds an unfinished run with a different "
                               f"config ({'; '.join(diffs[:3])}); resume it with its own config "
                               f"(RUN_DIR/run.json), or choose another --run-dir")
        return "resume"
    return "fresh"


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, source, val_ids: np.ndarray, micro: int, device, dtype,
             d: Dist, optimum_nats: float | None) -> dict[str, float]:
    """Validation loss (nats/token), bits per token and per byte on the fixed validation set."""
    model.eval()
    mine = val_ids[d.rank::d.world]
    nats = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(mine), micro):
        windows = torch.from_numpy(source.windows(mine[i:i + micro], data_loader.VALIDATION)).to(device)
        with dev.autocast(device, dtype):
            nats += model(windows[:, :-1], windows[:, 1:], reduction="sum").double()
    nats = all_reduce_sum(nats, d).item()
    model.train()
    n_tokens = len(val_ids) * source.seq_len
    n_bytes = int(source.window_bytes(val_ids, data_loader.VALIDATION).sum())
    out = {"val_loss": nats / n_tokens, "val_bits_per_token": nats / n_tokens / math.log(2),
           "val_bpb": nats / (math.log(2) * n_bytes)}
    if optimum_nats is not None:
        out["val_opt_loss"] = optimum_nats / n_tokens
        out["val_excess_loss"] = out["val_loss"] - out["val_opt_loss"]
    return out


# ----------------------------------------------------------------------------- train


def train(config: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          init_from: dict | None = None, parent: dict | None = None,
          prefix_metrics: list[dict] | None = None) -> dict:
    """Train one run into run_dir. Returns a summary dict (also written into run.json).

    init_from: a loaded checkpoint to start from (cooldown branches); parent: recorded in run.json;
    prefix_metrics: metric lines shared with the parent, written first."""
    # Listen for SIGTERM/SIGUSR1 from the very start: a signal during start-up is honoured at
    # the first step boundary instead of killing the process with no resume point.
    with Preemption() as preempt:
        return _train(config, run_dir, resume, overwrite, init_from, parent, prefix_metrics, preempt)


def _train(config, run_dir, resume, overwrite, init_from, parent, prefix_metrics, preempt) -> dict:
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    d = init_distributed(config.train.device)
    device = dev.resolve_device(config.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = dev.resolve_precision(config.train.precision, device)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(d)
    mode = prepare_run_dir(config, run_dir, resume, overwrite, d)
    if mode == "done":
        if d.main:
            print(f"{run_dir}: already finished; nothing to do")
        return RunDir(run_dir).read_run().get("summary", {})

    info = describe(config)
    model_cfg = resolved_model(config)
    total_steps = info["planned_steps"]
    spec = run_schedule(config, total_steps)  # validated here, once
    gbt = config.train.global_batch_tokens
    seq_len = config.data.seq_len
    global_seqs = gbt // seq_len
    if global_seqs % d.world:
        raise TestbedError(f"train.global_batch_tokens={gbt} gives {global_seqs} sequences, not divisible "
                           f"by the {d.world} processes; choose a batch that splits evenly")
    local_seqs = global_seqs // d.world
    micro = config.train.micro_batch_size or auto_micro_batch(config, device, local_seqs, d)
    if local_seqs % micro:
        raise TestbedError(f"train.micro_batch_size={micro} does not divide the {local_seqs} sequences "
                           f"each process takes per step; choose a divisor of {local_seqs}")
    accum = local_seqs // micro

    source = data_loader.make_source(config)
    plan = data_loader.BatchPlan(source, global_seqs, config.data.seed, config.data.unique_tokens, total_steps)
    val_ids = data_loader.validation_windows(source, config.data.val_sequences)
    optimum = None
    if getattr(source, "has_optimum", False):
        optimum = float(source.optimal_nats(source.windows(val_ids, data_loader.VALIDATION)).sum())

    torch.manual_seed(config.train.seed)
    if config.train.deterministic and device.type == "cuda":
        # CPU kernels are already deterministic (and this call costs ~1.7 s of imports).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    model = Transformer(model_cfg).to(device)
    model.activation_checkpointing = config.train.activation_checkpointing
    base_model = model

    start_step = 0
    resumed_from = None
    loaded = init_from
    t_restore = time.perf_counter()
    if mode == "resume":
        folder = ckpt.latest_valid(run_dir)
        if folder is None:
            if any(ckpt.list_checkpoints(run_dir)):
                raise TestbedError(f"run directory {str(run_dir)!r} holds an unfinished run whose "
                                   f"checkpoints are all damaged; pass --overwrite to restart it from scratch")
            mode = "fresh"  # interrupted before its first checkpoint: nothing to resume from
        else:
            loaded = ckpt.load(folder)
            resumed_from = str(folder)
    if loaded is not None:
        load_model_state(base_model, loaded["model"], config, Dist())
        start_step = int(loaded["state"]["step"])
        restore_rng(loaded["rng"], device)
    restore_s = time.perf_counter() - t_restore

    compiled = dev.use_compile(config.train.compile, device)
    if compiled:
        # Regional compilation (as torchtitan does): every block shares one compiled graph, so
        # compiling takes seconds whatever the depth, and parameter names stay unchanged.
        for block in base_model.blocks:
            block.compile()
        base_model.compile_loss = True
    # The optimiser is built on the wrapped model: FSDP2 replaces parameters by sharded ones.
    model = wrap_model(model, config, device, d)
    optimizer = build_optimizer(model, config.optim, device)
    if loaded is not None:
        t_restore = time.perf_counter()
        load_optim_state(model, optimizer, loaded["optim"], config, d)
        restore_s += time.perf_counter() - t_restore
    peak, peak_name = dev.peak_flops(device, dtype)
    fpt = flops_per_token(model_cfg, seq_len)

    rd = RunDir(run_dir)
    this_run_id = run_id(config.to_dict())
    metrics = MetricsLog(run_dir, enabled=d.main)
    if d.main:
        if mode == "resume":
            metrics.truncate_after(start_step)
            ckpt.truncate_index(run_dir, start_step)
            for aside in ckpt.set_aside_newer(run_dir, start_step):
                log_line(run_dir, f"damaged checkpoint moved aside to {aside}")
            if not any(line["step"] == start_step for line in rd.index()):
                # Killed between the folder's rename and its index line: write the line now, with
                # the evaluation the killed process logged for that step just before saving.
                ev = next((m for m in rd.metrics() if m.get("step") == start_step
                           and "val_loss" in m), {})
                rd.append_index({
                    "tokens": start_step * gbt, "flops": start_step * gbt * fpt,
                    "val_loss": ev.get("val_loss"), "val_bpb": ev.get("val_bpb"),
                    "lr": spec.lr(max(start_step - 1, 0), total_steps, config.optim.lr, gbt),
                    "phase": spec.phase(max(start_step - 1, 0), total_steps), "step": start_step,
                    "kind": loaded["state"]["kind"], "path": f"checkpoints/{Path(resumed_from).name}"})
        else:
            rd.metrics_path.unlink(missing_ok=True)
            if prefix_metrics:
                for line in prefix_metrics:
                    metrics.log(line)
        run_json = {"run_id": this_run_id, "config": config.to_dict(), "labels": config.labels, **info,
                    "data_entropy": optimum / (len(val_ids) * seq_len) if optimum is not None else None,
                    "data_fingerprint": source.fingerprint(), "parent": parent,
                    "world_size": d.world, "device": str(device), "precision": str(dtype).replace("torch.", ""),
                    "peak_flops": peak, "peak_flops_source": peak_name, "host": socket.gethostname()}
        rd.write_run(run_json)
        rd.write_status("running", step=start_step,
                        message=f"resumed from {resumed_from}" if resumed_from else "started")
        log_line(run_dir, f"{'resume from ' + resumed_from if resumed_from else 'start'} at step "
                          f"{start_step}/{total_steps} on {device} ({d.world} process(es), {dtype})")
        metrics.start_wandb(config.logging.wandb_project, config.logging.wandb_mode, this_run_id,
                            config.to_dict(), run_dir) if config.logging.wandb else None

    science = science_steps(config, total_steps)
    rolling_every = config.checkpoint.rolling_every
    last_eval: dict[str, float] = {}
    last_eval_step = -1
    timing = {"train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0, "compile_s": 0.0}

    def run_eval(step: int) -> dict[str, float]:
        nonlocal last_eval, last_eval_step
        if last_eval_step == step:
            return last_eval
        # Training kernels still queued on the GPU belong to the step time, not to validation.
        dev.synchronize(device)
        t0 = time.perf_counter()
        last_eval = evaluate(model, source, val_ids, micro, device, dtype, d, optimum)
        last_eval_step = step
        timing["eval_s"] += time.perf_counter() - t0
        if d.main:
            metrics.log({"step": step, "tokens": step * gbt, "flops": step * gbt * fpt,
                         "lr": spec.lr(max(step - 1, 0), total_steps, config.optim.lr, gbt),
                         "epoch": plan.epochs_at(step), **last_eval})
        return last_eval

    def save(step: int, kind: str) -> None:
        dev.synchronize(device)  # as in run_eval: queued training kernels are step time
        t0 = time.perf_counter()
        bad = torch.zeros((), device=device)
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2: this rank's shard
            bad += (~torch.isfinite(local.detach())).sum()
        if all_reduce_sum(bad, d).item():
            raise NonFiniteLoss(f"the weights became non-finite by step {step}; the last good checkpoint "
                                f"is kept. Lower optim.lr (now {config.optim.lr}) or raise warmup")
        ev = run_eval(step)
        model_state = full_model_state(model, config, d)
        optim_state = full_optim_state(model, optimizer, config, d)
        # The train-loss line averages the steps since the last one; a resume between two lines
        # must continue that average, or the next line differs from an uninterrupted run's.
        window_sum = all_reduce_sum(loss_sum.clone(), d).item()
        if d.main:
            rng = rng_state(device)
            state = {"tokens": step * gbt, "total_steps": total_steps, "run_id": this_run_id,
                     "config": config.to_dict(), "world_size": d.world,
                     "log_window": {"loss_sum": window_sum, "steps": steps_in_window}}
            fields = {"tokens": step * gbt, "flops": step * gbt * fpt, "val_loss": ev["val_loss"],
                      "val_bpb": ev["val_bpb"], "lr": spec.lr(max(step - 1, 0), total_steps, config.optim.lr, gbt),
                      "phase": spec.phase(max(step - 1, 0), total_steps)}
            ckpt.save(run_dir, step, kind, model_state, optim_state, rng, state, fields)
            ckpt.apply_retention(run_dir, config.checkpoint.keep_rolling)
        barrier(d)
        timing["checkpoint_s"] += time.perf_counter() - t0

    progress = None
    if d.main and config.logging.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc=this_run_id, unit="step",
                        mininterval=1.0, dynamic_ncols=True, leave=False)

    model.train()
    t_startup = time.perf_counter() - t_start
    window_t0, window_tokens = time.perf_counter(), 0

    # tokens_per_s is the speed of training steps: validation and checkpoints that fall inside a
    # logging window are taken out of its time.
    def paused() -> float:
        return timing["eval_s"] + timing["checkpoint_s"]

    window_paused = paused()
    loss_sum = torch.zeros((), device=device)
    steps_in_window = 0
    window = (loaded or {}).get("state", {}).get("log_window")
    # Continue the window only when it ends where this run's next line falls (train.log_every
    # may change across a resume). Each process takes its share of the summed losses back.
    if window and window["steps"] and window["steps"] == start_step % config.train.log_every:
        loss_sum.fill_(window["loss_sum"] / d.world)
        steps_in_window = int(window["steps"])
    exit_code = 0
    state_msg = ("done", "finished")
    step = done = start_step
    prefetch = Prefetcher(plan, d.rank, d.world, device)
    try:
        with nullcontext():
            for step in range(start_step, total_steps):
                t_step = time.perf_counter()
                lr = spec.lr(step, total_steps, config.optim.lr, gbt)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = prefetch.get(step, step + 1 if step + 1 < total_steps else None)
                step_loss = torch.zeros((), device=device)
                for k in range(accum):
                    mb = batch[k * micro:(k + 1) * micro]
                    sync = nullcontext()
                    if d.world > 1 and k < accum - 1 and hasattr(model, "no_sync"):
                        sync = model.no_sync()
                    with sync:
                        with dev.autocast(device, dtype):
                            loss = model(mb[:, :-1], mb[:, 1:])
                        (loss / accum).backward()
                    step_loss += loss.detach() / accum
                clip = config.optim.grad_clip
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
                check_now = device.type == "cpu" or (step + 1) % config.train.log_every == 0
                if check_now and not torch.isfinite(step_loss).item():
                    raise NonFiniteLoss(
                        f"the training loss became {step_loss.item()} at step {step + 1}; the last good "
                        f"checkpoint is kept. Lower optim.lr (now {config.optim.lr}) or raise warmup")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                loss_sum += step_loss
                steps_in_window += 1
                window_tokens += gbt
                if compiled and step == start_step:
                    # The first step of a process compiles: time it apart and start the
                    # throughput window after it, so tokens_per_s is the steady-state speed.
                    dev.synchronize(device)
                    timing["compile_s"] = time.perf_counter() - t_step
                    window_t0, window_tokens, window_paused = time.perf_counter(), 0, paused()
                else:
                    timing["train_s"] += time.perf_counter() - t_step
                if progress is not None:
                    progress.update(1)

                if done % config.train.log_every == 0 or done == total_steps:
                    mean_loss = all_reduce_sum(loss_sum.clone(), d).item() / d.world / steps_in_window
                    dev.synchronize(device)
                    elapsed = time.perf_counter() - window_t0 - (paused() - window_paused)
                    tps = window_tokens / elapsed if window_tokens else None
                    if d.main:
                        metrics.log({"step": done, "tokens": done * gbt, "flops": done * gbt * fpt,
                                     "lr": lr, "train_loss": mean_loss, "grad_norm": grad_norm.item(),
                                     "tokens_per_s": tps, "mfu": tps * fpt / peak if peak and tps else None,
                                     "peak_mem_gb": (dev.peak_memory_bytes(device) or 0) / 2**30,
                                     "epoch": plan.epochs_at(done)})
                        if progress is not None:
                            progress.set_postfix(loss=f"{mean_loss:.3f}", refresh=False)
                    loss_sum.zero_()
                    steps_in_window, window_tokens = 0, 0
                if done % config.train.eval_every == 0 or done == total_steps:
                    run_eval(done)
                if done in science:
                    save(done, "science")
                elif rolling_every and done % rolling_every == 0 and done != total_steps:
                    save(done, "rolling")
                if preempt.requested and done < total_steps:
                    if not (rolling_every and done % rolling_every == 0) and done not in science:
                        save(done, "rolling")
                    exit_code = exits.PREEMPTED
                    state_msg = ("preempted", f"{preempt.requested} at step {done}; resume checkpoint saved")
                    break
                if steps_in_window == 0:
                    window_t0, window_paused = time.perf_counter(), paused()
            else:
                if config.checkpoint.final:
                    save(total_steps, "final")
                else:
                    run_eval(total_steps)
    except BaseException as err:
        if d.main:
            message = str(err) if isinstance(err, TestbedError) else f"{type(err).__name__}: {err}"
            rd.write_status("failed", step=done, message=message)
            log_line(run_dir, f"failed at step {done}: {message}")
            metrics.finish(exit_code=1)
        raise
    finally:
        prefetch.close()
        if progress is not None:
            progress.close()

    wall = time.perf_counter() - t_start
    summary = {"state": state_msg[0], "steps": done, "planned_steps": total_steps,
               **{k: v for k, v in last_eval.items()},
               "micro_batch_size": micro,
               "timing": {"wall_s": wall, "startup_s": t_startup, "restore_s": restore_s, **timing,
                          "other_s": wall - t_startup - sum(timing.values())}}
    if d.main:
        run_json = rd.read_run()
        run_json["summary"] = summary
        rd.write_run(run_json)
        rd.write_status(state_msg[0], step=done, message=state_msg[1])
        log_line(run_dir, f"{state_msg[0]}: {state_msg[1]} (wall {wall:.1f}s)")
        metrics.finish(exit_code=0)
    summary["exit_code"] = exit_code
    barrier(d)
    return summary


def log_line(run_dir: Path, text: str) -> None:
    with open(RunDir(run_dir).log_path, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


def load_run_config(run_dir: Path) -> Config:
    run = RunDir(run_dir).read_run()
    if run is None:
        raise TestbedError(f"{str(run_dir)!r} is not a run directory (no run.json); pass the folder "
                           f"given to `testbed train --run-dir`")
    return saved_config(run["config"])
