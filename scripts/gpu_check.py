#!/usr/bin/env python
"""The whole GPU check in one process: writes OUT/gpu_check.json and OUT/gpu_check.log.

Sections (each timed; one failing is recorded and the others still run):
  correctness   bf16 autocast against fp32: validation losses of the 10m rung after 200 steps
  throughput    the real trainer (bf16, torch.compile per block, fused AdamW, fused chunked
                cross-entropy, micro-batch found automatically) at GPT-2 124M shape (seq 1024)
                and the 300m and 1b rungs (seq 2048): tokens/s, MFU, compile time, peak memory
  baseline      a plain `transformers` LlamaForCausalLM loop with the same shape, batch,
                bf16 autocast, fused AdamW and per-layer compile, timed in the same process
  vocab128k     the 1b rung at vocab 128,256 and seq 2048: the largest micro-batch that fits,
                and the memory the plain (materialised fp32 logits) loss needs at that size
  resume        SIGKILL a CUDA run after a checkpoint, resume it, compare with an uninterrupted
                run (dropout on, so the CUDA generator's state matters)
  loss          the fused chunked cross-entropy at the 124M shape (16k tokens, vocab 50,304),
                forward + backward in ms, with the elementwise part eager and compiled
  syncs         host-device synchronisations per training step outside logging steps (torch's
                sync debug mode over 20- and 30-step runs; expected 0)
  checkpoint    (within the 1b throughput run) save and load time of the full state, and the
                stall it would cause on a log-spaced schedule
  profile       torch.profiler over three compiled steps of the last rung: where GPU time goes

MFU = tokens/s x FLOPs per token / peak, with FLOPs per token = 6 N_matmul + 12 L T d (PaLM,
testbed/model/counting.py) and the data-sheet dense bf16 peak (989.4 TFLOP/s for H100 SXM and
H200). --memory-gib caps the caching allocator (default 78 GiB, so an H200 reports what fits
on an 80 GB H100).

    python scripts/gpu_check.py --out results/         # on a CUDA machine (about 6 minutes)
    python scripts/gpu_check.py --smoke --out /tmp/g   # tiny version on the CPU (the tests run it)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout with the machine's python as it is

COMMON = ["logging.wandb=false", "logging.progress=false"]
GPT2_124M = ["model.d_model=768", "model.n_layers=12", "model.n_heads=12", "model.tie_embeddings=true",
             "model.vocab_size=50304", "model.max_seq_len=1024"]


class Report:
    """The JSON result and the log, both rewritten after every section (a timeout keeps them)."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.result: dict = {}
        self.log_file = open(out / "gpu_check.log", "a")

    def log(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def section(self, name: str, fn, *args) -> None:
        self.log(f"--- {name}")
        t0 = time.perf_counter()
        try:
            value = fn(self, *args)
        except Exception as err:  # one failing section must not lose the others' figures
            value = {"error": f"{type(err).__name__}: {err}"}
            self.log(traceback.format_exc())
        value["section_s"] = round(time.perf_counter() - t0, 1)
        self.result[name] = value
        self.log(f"{name}: {json.dumps(value)}")
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=1))


def run_trainer(overrides: list[str], run_dir: Path) -> tuple[dict, list[dict]]:
    from testbed.config import load_config
    from testbed.train.trainer import train

    summary = train(load_config(None, COMMON + overrides), run_dir)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, lines


def release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------- sections


def environment(report: Report, args) -> dict:
    import torch

    info = {"torch": torch.__version__, "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "smoke": args.smoke}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, cuda=torch.version.cuda, memory_gib=round(props.total_memory / 2**30, 1),
                    memory_cap_gib=args.memory_gib)
        if args.memory_gib and props.total_memory / 2**30 > args.memory_gib:
            torch.cuda.set_per_process_memory_fraction(args.memory_gib * 2**30 / props.total_memory)
    else:
        from testbed.train.device import cpu_has_bf16_units

        info.update(device="cpu", cpu_bf16_units=cpu_has_bf16_units())
    for module in ("transformers", "triton", "wandb", "datasets"):
        try:
            info[module] = __import__(module).__version__
        except Exception:
            info[module] = None
    return info


def correctness(report: Report, args, tmp: Path) -> dict:
    preset, steps, batch = ("100k", 10, 1024) if args.smoke else ("10m", 200, 8192)
    base = [f"model.preset={preset}", "data.seq_len=128", "model.max_seq_len=128",
            f"train.global_batch_tokens={batch}", f"train.steps={steps}", f"train.eval_every={steps}",
            "optim.lr=3e-3", f"schedule.warmup_steps={steps // 5}", "checkpoint.final=false",
            "train.compile=false"]
    fp32, _ = run_trainer(base + ["train.precision=fp32"], tmp / "fp32")
    bf16, _ = run_trainer(base + ["train.precision=bf16"], tmp / "bf16")
    gap = abs(bf16["val_loss"] - fp32["val_loss"])
    return {"preset": preset, "steps": steps, "fp32_val_loss": fp32["val_loss"],
            "bf16_val_loss": bf16["val_loss"], "abs_gap": gap, "rel_gap": gap / fp32["val_loss"],
            "ok": gap < 0.02 * fp32["val_loss"]}


def rung_overrides(rung: str, args) -> tuple[list[str], int]:
    """(overrides, seq_len) of a benchmark rung."""
    if args.smoke:
        return ["model.preset=100k", "model.vocab_size=256", "model.max_seq_len=64"], 64
    if rung == "124m":
        return list(GPT2_124M), 1024
    return [f"model.preset={rung}", f"model.vocab_size={args.vocab}"], 2048


def throughput(report: Report, args, tmp: Path, rung: str) -> dict:
    from testbed.config import load_config
    from testbed.model.counting import count_params, flops_per_token
    from testbed.plan import resolved_model

    model, seq_len = rung_overrides(rung, args)
    seqs, steps, log_every = (4, 6, 2) if args.smoke else {"124m": (64, 31, 10), "300m": (32, 25, 8),
                                                           "1b": (32, 16, 5)}.get(rung, (32, 16, 5))
    extra = ["train.device=cpu", "train.precision=fp32"] if args.smoke else ["train.precision=bf16"]
    overrides = model + extra + [
        "data.source=random", f"data.seq_len={seq_len}", "data.val_sequences=8",
        f"train.global_batch_tokens={seqs * seq_len}", f"train.steps={steps}", f"train.log_every={log_every}",
        f"train.eval_every={steps}", "checkpoint.final=true"]
    if rung == args.checkpoint_rung or args.smoke:
        overrides.append(f"checkpoint.every={steps - log_every}")  # two full saves: one mid-run, the final
    release_memory()
    run_dir = tmp / f"tp-{rung}"
    summary, lines = run_trainer(overrides, run_dir)
    cfg = resolved_model(load_config(None, COMMON + overrides))
    timed = [x for x in lines if x.get("tokens_per_s")]
    out = {"rung": rung, "params": count_params(cfg).total, "non_embedding": count_params(cfg).non_embedding,
           "seq_len": seq_len, "vocab": cfg.vocab_size, "global_batch_tokens": seqs * seq_len,
           "micro_batch": summary["micro_batch_size"], "flops_per_token": flops_per_token(cfg, seq_len),
           "windows_tokens_per_s": [round(x["tokens_per_s"]) for x in timed],
           "tokens_per_s": statistics.median(x["tokens_per_s"] for x in timed),
           "mfu": statistics.median(x["mfu"] for x in timed) if timed[0]["mfu"] is not None else None,
           "peak_mem_gib": max(x["peak_mem_gb"] for x in timed),
           "compile_s": summary["timing"]["compile_s"], "train_s": summary["timing"]["train_s"],
           "final_train_loss": next(x["train_loss"] for x in reversed(lines) if "train_loss" in x)}
    if "checkpoint.every" in " ".join(overrides):
        out["checkpoint"] = checkpoint_cost(run_dir, summary, out)
    return out


def checkpoint_cost(run_dir: Path, summary: dict, tp: dict) -> dict:
    """Save time (the trainer's own timing: non-finite check, evaluation, copy to host, write,
    checksums, fsync), load time (read and verify), and the stall on a log-spaced schedule."""
    from testbed.train import checkpoint as ckpt

    folders = ckpt.list_checkpoints(run_dir)
    size = sum(f.stat().st_size for f in folders[-1].iterdir())
    t0 = time.perf_counter()
    loaded = ckpt.load(folders[-1])
    load_s = time.perf_counter() - t0
    del loaded
    save_s = summary["timing"]["checkpoint_s"] / len(folders)
    # A Chinchilla-sized run of this model (20 tokens per parameter) with 30 log-spaced
    # checkpoints plus a rolling one every hour, at the measured speed.
    tokens = 20 * tp["params"]
    wall = tokens / tp["tokens_per_s"]
    saves = 30 + wall // 3600
    return {"bytes": size, "saves_timed": len(folders), "save_s": save_s, "load_s": load_s,
            "chinchilla_run_hours": wall / 3600, "saves_on_schedule": saves,
            "stall_fraction": saves * save_s / wall}


def baseline(report: Report, args, rung: str, micro: int) -> dict:
    """A plain transformers loop: same shape, batch, precision, optimiser; compiled per layer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from testbed.config import load_config
    from testbed.model.counting import flops_per_token
    from testbed.plan import resolved_model

    model_overrides, seq_len = rung_overrides(rung, args)
    cfg = resolved_model(load_config(None, COMMON + model_overrides + [f"data.seq_len={seq_len}"]))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    release_memory()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=seq_len, tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa")).to(device)
    compiled = device.type == "cuda"
    if compiled:
        for layer in model.model.layers:
            layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    steps, warmup = (4, 1) if args.smoke else (20, 3)
    seqs = 64 if rung == "124m" and not args.smoke else (4 if args.smoke else 32)
    data = torch.randint(0, cfg.vocab_size, (steps + warmup, seqs, seq_len + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(i: int) -> None:
        accum = seqs // micro
        for k in range(accum):
            x = data[i, k * micro:(k + 1) * micro]
            with autocast:
                logits = model(x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab_size),
                                                     x[:, 1:].reshape(-1))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    while True:  # the plain loss needs more memory than ours: halve the micro-batch until it fits
        try:
            for i in range(warmup):
                step(i)
            break
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            release_memory()
            if micro == 1:
                raise
            micro //= 2
            report.log(f"baseline {rung}: out of memory, micro-batch {micro * 2} -> {micro}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    tps = steps * seqs * seq_len / (time.perf_counter() - t0)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    model = opt = data = None  # free the GPU memory before the next section
    release_memory()
    return {"rung": rung, "micro_batch": micro, "accum": seqs // micro, "compiled_per_layer": compiled,
            "warmup_s": warm_s, "tokens_per_s": tps, "flops_per_token": flops_per_token(cfg, seq_len),
            "peak_mem_gib": peak_mem}


def vocab128k(report: Report, args) -> dict:
    """Largest micro-batch of the 1b rung at vocab 128,256 (fused loss), then one step of the
    plain loss at that micro-batch: its peak memory, or the out-of-memory it runs into."""
    import torch

    from testbed.config import load_config
    from testbed.model.transformer import Transformer
    from testbed.plan import resolved_model
    from testbed.train.memory import largest_micro_batch

    if args.smoke or not torch.cuda.is_available():
        return {"skipped": "needs CUDA"}
    config = load_config(None, COMMON + ["model.preset=1b", "model.vocab_size=128256", "data.seq_len=2048",
                                         "data.source=random", "train.precision=bf16"])
    release_memory()
    t0 = time.perf_counter()
    micro = largest_micro_batch(config, limit=32)
    probe_s = time.perf_counter() - t0
    out = {"micro_batch": micro, "tokens_per_micro_batch": micro * 2048, "probe_s": probe_s}
    for name in ("fused", "plain"):
        release_memory()
        model = Transformer(resolved_model(config)).cuda()
        x = torch.randint(0, 128256, (micro, 2049), device="cuda")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if name == "fused":
                    loss = model(x[:, :-1], x[:, 1:])
                else:
                    logits = model(x[:, :-1])
                    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            torch.cuda.synchronize()
            out[f"{name}_peak_gib_fwd_bwd"] = torch.cuda.max_memory_allocated() / 2**30
        except torch.OutOfMemoryError:
            out[f"{name}_peak_gib_fwd_bwd"] = "out of memory"
        finally:
            loss = logits = None
            del model, x
            release_memory()
    return out


def resume(report: Report, args, tmp: Path) -> dict:
    """resume_once with the check's settings; where a setting fails on this machine, the error
    is recorded and the check retried without it, so one call still yields a comparison."""
    failures = {}
    variants = [{}, {"deterministic": False}, {"deterministic": False, "dropout": 0.0},
                {"deterministic": False, "dropout": 0.0, "compile": False}]
    for i, variant in enumerate(variants):
        try:
            out = resume_once(report, args, tmp / f"resume-{i}", variant)
            out.update(variant=variant, failed_variants=failures)
            return out
        except Exception as err:
            failures[json.dumps(variant)] = f"{type(err).__name__}: {err}"[-3000:]
            report.log(f"resume with {variant} failed: {failures[json.dumps(variant)]}")
    raise RuntimeError(f"every variant failed: {failures}")


def resume_once(report: Report, args, tmp: Path, variant: dict) -> dict:
    """Uninterrupted run vs the same run SIGKILLed after its step-40 checkpoint and resumed,
    each in its own `python -m testbed train` process, as a cluster would run them."""
    import yaml

    tmp.mkdir(parents=True, exist_ok=True)
    steps, kill_at = 60, 40
    device = "cpu" if args.smoke else "cuda"
    config = {"model": {"preset": "100k" if args.smoke else "10m", "max_seq_len": 256, "dropout": 0.1},
              "data": {"seq_len": 64 if args.smoke else 256, "val_sequences": 8},
              "train": {"steps": steps, "global_batch_tokens": (8 if args.smoke else 32) * (64 if args.smoke else 256),
                        "device": device, "log_every": 5, "eval_every": 20, "deterministic": True},
              "checkpoint": {"rolling_every": 20}, "optim": {"lr": 3e-3}, "logging": {"wandb": False, "progress": False}}
    config["model"]["dropout"] = variant.get("dropout", 0.1)
    config["train"]["deterministic"] = variant.get("deterministic", True)
    if "compile" in variant:
        config["train"]["compile"] = variant["compile"]
    cfg_path = tmp / "resume.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "testbed", "train", str(cfg_path), "--run-dir"]
    full, killed = tmp / "resume-full", tmp / "resume-killed"
    def run(args: list[str]) -> None:
        done = subprocess.run(cmd + args, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"`testbed train {' '.join(args)}` exited {done.returncode}: {done.stderr[-3000:]}")

    run([str(full)])
    proc = subprocess.Popen(cmd + [str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    index = killed / "checkpoints" / "index.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if index.exists() and any(json.loads(x)["step"] >= kill_at for x in index.read_text().splitlines() if x.strip()):
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        raise RuntimeError(f"the run to be killed ended first: {proc.stderr.read().decode()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = max(json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()
                       if "train_loss" in x)
    run([str(killed), "--resume"])

    def losses(run_dir: Path) -> dict[int, float]:
        out = {}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            m = json.loads(line)
            for key in ("train_loss", "val_loss"):
                if key in m:
                    out[(key, m["step"])] = m[key]
        return out

    a, b = losses(full), losses(killed)
    diffs = [abs(a[k] - b[k]) for k in a if k in b]
    return {"device": device, "steps": steps, "killed_after_step": killed_after,
            "resumed_from": kill_at, "compared_values": len(diffs), "missing": sorted(set(a) ^ set(b)),
            "max_abs_diff": max(diffs), "bit_identical": max(diffs) == 0.0 and set(a) == set(b)}


def syncs(report: Report, args, tmp: Path) -> dict:
    """Host-device synchronisations the trainer causes, from torch's sync debug mode: a run of
    30 steps that logs, validates and saves only at its end, so any sync in the 29 steps before
    would show as a count that grows with the steps (two runs, 20 and 30 steps, are compared)."""
    import warnings

    import torch

    if args.smoke or not torch.cuda.is_available():
        return {"skipped": "needs CUDA"}
    counts, messages = {}, set()
    for steps in (20, 30):
        overrides = ["model.preset=10m", "model.vocab_size=4096", "data.source=random", "data.seq_len=256",
                     "model.max_seq_len=256", "train.global_batch_tokens=8192", f"train.steps={steps}",
                     f"train.log_every={steps}", f"train.eval_every={steps}", "data.val_sequences=8",
                     "train.compile=false", "train.micro_batch_size=32", "checkpoint.final=false"]
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run_trainer(overrides, tmp / f"syncs-{steps}")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        found = [w for w in caught if "synchroniz" in str(w.message).lower()]
        counts[steps] = len(found)
        messages.update(f"{Path(w.filename).name}:{w.lineno}" for w in found)
    return {"syncs_at_20_steps": counts[20], "syncs_at_30_steps": counts[30],
            "per_step_syncs": (counts[30] - counts[20]) / 10, "where": sorted(messages)[:20]}


def loss(report: Report, args) -> dict:
    """The head's fused cross-entropy alone, eager against compiled elementwise, side by side:
    the same inputs, each timed over 20 forward+backward passes after warm-up."""
    import torch

    from testbed.model.loss import linear_cross_entropy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, d, vocab = (64, 32, 512) if args.smoke else (16 * 1024, 768, 50304)
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, d, device=device, generator=gen, requires_grad=True)
    w = (torch.randn(vocab, d, device=device, generator=gen) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    result = {"tokens": tokens, "d_model": d, "vocab": vocab}
    grads = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        def once(compiled=compiled):
            h.grad = w.grad = None
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                value = linear_cross_entropy(h, w, t, compiled=compiled)
            value.backward()
            return value
        for _ in range(3):
            value = once()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            once()
        if device == "cuda":
            torch.cuda.synchronize()
        result[f"{name}_ms"] = (time.perf_counter() - t0) / 20 * 1000
        result[f"{name}_loss"] = value.item()
        grads[name] = (h.grad.clone(), w.grad.clone())
    result["speedup"] = result["eager_ms"] / result["compiled_ms"]
    result["max_grad_h_diff"] = (grads["eager"][0] - grads["compiled"][0]).abs().max().item()
    result["loss_diff"] = abs(result["eager_loss"] - result["compiled_loss"])
    # The z-loss (PaLM) rides in the same pass: its compiled gradient must equal the eager one.
    from testbed.model.loss import linear_cross_entropy_terms

    z = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        h.grad = w.grad = None
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            objective, _, lse_sq = linear_cross_entropy_terms(h, w, t, z_loss=1e-4, compiled=compiled)
        objective.backward()
        z[name] = (objective.item(), lse_sq.item(), h.grad.clone())
    result["z_loss_objective_diff"] = abs(z["eager"][0] - z["compiled"][0])
    result["z_loss_lse_sq"] = z["eager"][1]
    result["z_loss_max_grad_h_diff"] = (z["eager"][2] - z["compiled"][2]).abs().max().item()
    return result


def profile(report: Report, args, rung: str, micro: int) -> dict:
    """Where a compiled training step's GPU time goes: torch.profiler over 3 steps after warm-up;
    the table of the top kernels by self CUDA time is written beside the JSON."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from testbed.config import load_config
    from testbed.model.transformer import Transformer
    from testbed.optim import build_optimizer
    from testbed.plan import resolved_model

    if args.smoke or not torch.cuda.is_available():
        return {"skipped": "needs CUDA"}
    model_overrides, seq_len = rung_overrides(rung, args)
    config = load_config(None, COMMON + model_overrides + [f"data.seq_len={seq_len}", "data.source=random"])
    release_memory()
    model = Transformer(resolved_model(config)).cuda()
    for block in model.blocks:
        block.compile()
    model.compile_loss = True
    opt = build_optimizer(model, config.optim, torch.device("cuda"))
    x = torch.randint(0, model.cfg.vocab_size, (micro, seq_len + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
    (report.out / f"profile_{rung}.txt").write_text(table)
    events = prof.key_averages()
    total = sum(e.self_device_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:12]
    model = opt = x = None  # free the GPU memory before the next section
    release_memory()
    return {"rung": rung, "micro_batch": micro, "cuda_ms_per_step": total / 3 / 1000,
            "top": [{"name": e.key[:80], "share": e.self_device_time_total / total} for e in top]}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny CPU version that checks the script runs")
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.log")
    p.add_argument("--rungs", default="124m,300m,1b", help="throughput rungs: 124m (GPT-2 shape) or ladder presets")
    p.add_argument("--baseline-rungs", default="124m", help="rungs also timed with the transformers loop")
    p.add_argument("--checkpoint-rung", default="1b", help="rung whose checkpoint save/load is timed")
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary of the ladder rungs")
    p.add_argument("--memory-gib", type=float, default=78.0, help="cap GPU memory (0: no cap)")
    p.add_argument("--profile-rung", default="", help="rung to profile (default: the last throughput rung)")
    p.add_argument("--sections", default="correctness,resume,loss,syncs,throughput,vocab128k,profile",
                   help="which sections to run, comma-separated")
    args = p.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    report = Report(Path(args.out))
    sections = args.sections.split(",")
    report.section("environment", environment, args)
    rungs = ["100k"] if args.smoke else args.rungs.split(",")
    baseline_rungs = rungs if args.smoke else args.baseline_rungs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "correctness" in sections:
            report.section("correctness", correctness, args, tmp)
        if "resume" in sections:
            report.section("resume", resume, args, tmp)
        if "loss" in sections:
            report.section("loss", loss, args)
        if "syncs" in sections:
            report.section("syncs", syncs, args, tmp)
        if "throughput" in sections:
            for rung in rungs:
                report.section(f"throughput_{rung}", throughput, args, tmp, rung)
                ours = report.result[f"throughput_{rung}"]
                if rung in baseline_rungs and "micro_batch" in ours:
                    report.section(f"baseline_{rung}", baseline, args, rung, ours["micro_batch"])
                    theirs = report.result[f"baseline_{rung}"]
                    if "tokens_per_s" in theirs:
                        ours["ratio_to_transformers"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
                        report.log(f"{rung}: testbed / transformers = {ours['ratio_to_transformers']:.3f}")
                for folder in tmp.glob(f"tp-{rung}/checkpoints"):  # free the disk for the next rung
                    import shutil

                    shutil.rmtree(folder, ignore_errors=True)
        if "vocab128k" in sections:
            report.section("vocab128k", vocab128k, args)
        if "profile" in sections:
            rung = args.profile_rung or rungs[-1]
            micro = report.result.get(f"throughput_{rung}", {}).get("micro_batch", 8)
            report.section(f"profile_{rung}", profile, args, rung, micro)
    failed = [k for k, v in report.result.items() if "error" in v]
    ok = not failed and report.result.get("correctness", {}).get("ok", True)
    report.log(f"done: {'all sections ran' if not failed else 'failed: ' + ', '.join(failed)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
