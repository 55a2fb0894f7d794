#!/usr/bin/env python
"""Several small runs on one GPU: aggregate throughput of k packed runs against one at a time.

For each model of a small ladder (the presets 1m, 3m, 10m, 30m) the same config is trained for a
fixed number of steps, first alone (k = 1: running k such runs one after another gives this
same rate), then as k separate `testbed train` processes started together on the one device
(each with TESTBED_GPU_MEMORY_FRACTION = 1/k and its share of the cores, as `testbed sweep run
--runs-per-gpu k` gives them). Reported per (model, k), side by side in one markdown table:

- wall tok/s: k x tokens / wall clock from the first start to the last exit (start-up, the
  micro-batch search and compilation included: what a sweep of such runs sees);
- steady tok/s: the sum over the k runs of tokens / train time (steps after the first; the
  trainer's own timing), i.e. the packed rate once all are training;
- MFU of each, against the data-sheet dense bf16 peak (testbed/train/device.py), or
  TESTBED_PEAK_FLOPS; unknown on a CPU unless that is set;
- speed-up of wall and steady tok/s over k = 1 of the same mode;
- compile s: each run's compile (and graph capture) time, its first steps, reported apart from
  the steady rate (the trainer's timing.compile_s, the mean over the k runs).

Each round runs in every mode of --modes: `blocks` (each block compiled, train.cuda_graphs
off), `graphs` (the whole forward and backward compiled into CUDA graphs, train.cuda_graphs=true)
or `eager` (nothing compiled).

    python scripts/bench_packing.py                     # GPU: 1m..30m, k = 1, 2, 4, 8, blocks and graphs
    python scripts/bench_packing.py --models 1m,3m --ks 4 --steps 300 --json out.json
    python scripts/bench_packing.py --smoke             # CPU: a tiny model, 3 steps, eager k = 1, 2, graphs k = 1

Timing uses time.perf_counter and the trainer's own run.json timing (perf_counter too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


MODES = {"eager": ["train.compile=false"],
         "blocks": ["train.compile=true", "train.cuda_graphs=false"],
         "graphs": ["train.compile=true", "train.cuda_graphs=true"]}
# The first steps a mode's run times apart (compiling; under graphs also the capture).
WARM_STEPS = {"eager": 0, "blocks": 1, "graphs": 2}


def overrides(args: argparse.Namespace, model: str, mode: str = "eager") -> list[str]:
    if args.smoke:  # a tiny model of the given width: seconds on a CPU
        shape = [f"model.d_model={int(model)}", "model.n_layers=2", "model.n_heads=2",
                 "model.max_seq_len=32", "data.seq_len=32", "train.global_batch_tokens=256"]
    else:
        shape = [f"model.preset={model}", f"data.seq_len={args.seq_len}",
                 f"model.max_seq_len={args.seq_len}",
                 f"train.global_batch_tokens={args.batch_tokens}"]
    return [*shape, "data.source=random", f"model.vocab_size={args.vocab}",
            f"train.steps={args.steps}", f"train.device={args.device}",
            f"train.precision={args.precision}", *MODES[mode],
            "train.eval_every=1000000", f"train.log_every={args.steps}", "data.val_sequences=1",
            "checkpoint.final=false", "checkpoint.log_spaced=0", "logging.wandb=false",
            "logging.progress=false"]


def describe(args: argparse.Namespace, model: str) -> dict:
    from testbed.config import load_config
    from testbed.plan import describe as plan

    return plan(load_config(None, overrides(args, model)))


def peak(args: argparse.Namespace) -> float | None:
    """The device's dense bf16 peak (or TESTBED_PEAK_FLOPS); None where unknown."""
    if args.device == "cpu" and not os.environ.get("TESTBED_PEAK_FLOPS"):
        return None  # no table for CPUs (and no torch import in this process)
    import torch

    from testbed.train import device as dev

    device = dev.resolve_device(args.device)
    dtype = dev.resolve_precision(args.precision, device)
    if dtype != torch.bfloat16 and not os.environ.get("TESTBED_PEAK_FLOPS"):
        return None
    return dev.peak_flops(device, torch.bfloat16)[0]


def packed_round(args: argparse.Namespace, model: str, mode: str, k: int, workdir: Path) -> dict:
    """k trainers started together; their wall clock and each one's run.json timing."""
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // k)), "PYTHONPATH": str(REPO)}
    if k > 1:
        env["TESTBED_GPU_MEMORY_FRACTION"] = f"{int(1e6 / k) / 1e6:.6f}"
    import yaml

    from testbed.config import load_config

    runs = [workdir / f"{model}-k{k}-{i}" for i in range(k)]
    configs = [workdir / f"{model}-k{k}-{i}.yaml" for i in range(k)]
    for i, path in enumerate(configs):
        config = load_config(None, [*overrides(args, model, mode), f"train.seed={i}"])
        path.write_text(yaml.safe_dump(config.to_dict()))
    logs = [open(run.with_suffix(".log"), "w") for run in runs]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "testbed", "train", str(config),
                               "--run-dir", str(run)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
             for config, run, log in zip(configs, runs, logs)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - t0
    for log in logs:
        log.close()
    if any(codes):
        bad = runs[next(i for i, c in enumerate(codes) if c)]
        raise SystemExit(f"a trainer failed ({model}, {mode}, k={k}); its output: {bad.with_suffix('.log')}\n"
                         + bad.with_suffix(".log").read_text()[-3000:])
    summaries = [json.loads((run / "run.json").read_text())["summary"] for run in runs]
    return {"wall_s": wall, "timing": [s["timing"] for s in summaries],
            "micro_batch_size": [s.get("micro_batch_size") for s in summaries]}


def measure(args: argparse.Namespace) -> list[dict]:
    peak_flops = peak(args)
    rows = []
    for model in args.models:
        info = describe(args, model)
        for mode in args.modes:
            rows += mode_rows(args, model, mode, info, peak_flops)
    return rows


def mode_rows(args: argparse.Namespace, model: str, mode: str, info: dict, peak_flops: float | None) -> list[dict]:
    """One model in one mode: alone, then k at once for each k of --ks."""
    tokens = args.steps * info["global_batch_tokens"]
    steady_tokens = max(1, args.steps - WARM_STEPS[mode]) * info["global_batch_tokens"]
    rows: list[dict] = []
    # The smoke mode compiles once on a CPU (about 15 s): graphs alone only.
    packed = [] if args.smoke and mode != "eager" else [k for k in args.ks if k > 1]
    for k in [1, *packed]:
        with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
            result = packed_round(args, model, mode, k, Path(tmp))
        wall_rate = k * tokens / result["wall_s"]
        steady = sum(steady_tokens / max(t.get("train_s") or 0.0, 1e-9) for t in result["timing"])
        row = {"model": model, "n_params": info["n_params"], "mode": mode, "k": k, "steps": args.steps,
               "compile_s": sum(t.get("compile_s") or 0.0 for t in result["timing"]) / k,
               "wall_s": result["wall_s"], "wall_tok_s": wall_rate, "steady_tok_s": steady,
               "micro_batch_size": result["micro_batch_size"],
               "wall_mfu": wall_rate * info["flops_per_token"] / peak_flops if peak_flops else None,
               "steady_mfu": steady * info["flops_per_token"] / peak_flops if peak_flops else None}
        alone = rows[0] if rows else row
        row["wall_speedup"] = wall_rate / alone["wall_tok_s"]
        row["steady_speedup"] = steady / alone["steady_tok_s"]
        rows.append(row)
        print(f"{model} {mode} k={k}: {wall_rate:,.0f} tok/s wall, {steady:,.0f} tok/s steady",
              file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = ["| model | params | mode | k | compile s | wall s | wall tok/s | steady tok/s | wall MFU | steady MFU "
             "| wall x | steady x |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['n_params'] / 1e6:.2f}M | {r['mode']} | {r['k']} | {r['compile_s']:.1f} "
                     f"| {r['wall_s']:.1f} "
                     f"| {r['wall_tok_s']:,.0f} | {r['steady_tok_s']:,.0f} | {pct(r['wall_mfu'])} "
                     f"| {pct(r['steady_mfu'])} | {r['wall_speedup']:.2f} | {r['steady_speedup']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1m,3m,10m,30m", help="presets of the ladder (default 1m,3m,10m,30m)")
    p.add_argument("--ks", default="2,4,8", help="runs packed at once, besides 1 (default 2,4,8)")
    p.add_argument("--steps", type=int, default=200, help="training steps of every run (default 200)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=16384, help="train.global_batch_tokens")
    p.add_argument("--vocab", type=int, default=32768, help="model.vocab_size (random tokens: data.source=random)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--modes", default="blocks,graphs",
                   help="compile modes, each round in each: eager, blocks, graphs (default blocks,graphs)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the script: a tiny model (d_model 16), 3 steps, k = 2 eager, k = 1 graphs")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.ks, args.steps, args.vocab, args.modes = "16", "2", 3, 64, "eager,graphs"
        args.device = "cpu" if args.device == "auto" else args.device
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"--modes {','.join(unknown)}: choose among {', '.join(MODES)}")
    rows = measure(args)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
