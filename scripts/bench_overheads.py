#!/usr/bin/env python
"""Overheads around training: CLI start-up, loader speed, and where a smoke sweep's time goes.

    python scripts/bench_overheads.py [--sweep configs/sweeps/smoke.yaml] [--json out.json] [--fork-server]

1. `testbed --help` wall time (median of 5 fresh processes).
2. Data loader: batches/s of the deterministic loader for each run of the sweep, against the
   steps/s the trainer achieved on the same run (target: the loader at least 20x faster).
3. Time split: each run is trained in a fresh `python -m testbed train` process (as the local
   executor does); its wall time is split into training steps, validation, checkpoints and the
   rest (interpreter and library start-up, data set-up, logging), from run.json's timing.
   With --fork-server each run is instead forked from one fork server, as the local executor
   does on CPU slots (testbed/sweep/forkserver.py); the server's own start-up (its imports,
   paid once per sweep slot) counts in the sweep's total as `server_start_s`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def help_time(n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "testbed", "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def loader_rate(config, steps: int = 50) -> float:
    from testbed.data import loader
    from testbed.plan import describe

    info = describe(config)
    source = loader.make_source(config)
    plan = loader.BatchPlan(source, config.train.global_batch_tokens // config.data.seq_len,
                            config.data.seed, config.data.unique_tokens, info["planned_steps"])
    plan.batch_tokens(0)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        plan.batch_tokens(step)
    return steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", default="configs/sweeps/smoke.yaml")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--fork-server", action="store_true",
                   help="fork every run from one warm fork server instead of a fresh process")
    args = p.parse_args(argv)

    import yaml

    from testbed.sweep.spec import load_sweep

    result = {"help_s": help_time(), "mode": "fork-server" if args.fork_server else "fresh-process"}
    sweep = load_sweep(args.sweep)
    rows = []
    server, server_start_s = None, 0.0
    if args.fork_server:
        from testbed.sweep.forkserver import ForkServer

        t0 = time.perf_counter()
        server = ForkServer(dict(os.environ))
        server.wait_ready()
        server_start_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        for run in sweep.runs:
            cfg_path = Path(tmp) / f"{run.run_id}.yaml"
            cfg_path.write_text(yaml.safe_dump(run.config.to_dict()))
            run_dir = Path(tmp) / run.run_id
            t0 = time.perf_counter()
            if server is None:
                subprocess.run([sys.executable, "-m", "testbed", "train", str(cfg_path), "--run-dir", str(run_dir)],
                               check=True, capture_output=True)
            else:
                log = Path(tmp) / f"{run.run_id}.log"
                child = server.start(["train", str(cfg_path), "--run-dir", str(run_dir)], log)
                code = server.wait(child)
                child.close()
                if code != 0:
                    raise SystemExit(f"{run.run_id} exited {code}:\n{log.read_text()[-2000:]}")
            wall = time.perf_counter() - t0
            timing = json.loads((run_dir / "run.json").read_text())["summary"]["timing"]
            steps = json.loads((run_dir / "run.json").read_text())["planned_steps"]
            rows.append({"run": run.run_id, "process_wall_s": wall, "train_s": timing["train_s"],
                         "eval_s": timing["eval_s"], "checkpoint_s": timing["checkpoint_s"],
                         "other_s": wall - timing["train_s"] - timing["eval_s"] - timing["checkpoint_s"],
                         "trainer_steps_per_s": steps / timing["train_s"],
                         "loader_steps_per_s": loader_rate(run.config)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    if server is not None:
        server.close()
    total = {k: sum(r[k] for r in rows) for k in ("process_wall_s", "train_s", "eval_s", "checkpoint_s", "other_s")}
    # The server's imports are start-up the sweep pays once: part of the time outside training.
    total["process_wall_s"] += server_start_s
    total["other_s"] += server_start_s
    result.update(server_start_s=server_start_s, runs=rows, total=total,
                  outside_training_fraction=1 - total["train_s"] / total["process_wall_s"],
                  min_loader_to_trainer_ratio=min(r["loader_steps_per_s"] / r["trainer_steps_per_s"] for r in rows))
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
