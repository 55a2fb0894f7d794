"""`testbed sweep plan|run|status`. Heavy modules are imported inside the handlers only."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from testbed.errors import TestbedError


def register(subparsers: argparse._SubParsersAction) -> None:
    sweep = subparsers.add_parser("sweep", help="plan, run and watch sweeps of training runs",
                                  description="Expand a sweep file into runs, train them locally "
                                  "or on SLURM, and follow their progress (see docs/sweep.md).")
    sub = sweep.add_subparsers(dest="sweep_command", metavar="ACTION")

    plan = sub.add_parser("plan", help="print every run's size, length and cost; trains nothing")
    plan.add_argument("sweep", help="sweep YAML file (e.g. configs/sweeps/smoke.yaml)")
    plan.add_argument("--device", default="h100",
                      help="device to estimate time for: a GPU of the trainer's peak table (h100, "
                      "h200, a100, l40s, a10g, ...) or cpu (measures this machine's matmul peak "
                      "at the runs' precision, as the trainer sees it); default h100")
    plan.add_argument("--mfu", type=float, default=0.4,
                      help="assumed model FLOPs utilisation, in (0, 1] (default 0.4)")
    plan.add_argument("--peak-flops", type=float, default=None,
                      help="device peak FLOP/s, overriding --device's table value")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan.set_defaults(func=plan_handler)

    run = sub.add_parser("run", help="train every run not yet done (skips finished runs)")
    run.add_argument("sweep", help="sweep YAML file")
    run.add_argument("--sweep-dir", default=None,
                     help="folder holding the registry and the run directories "
                     "(default: sweeps/<sweep name>)")
    run.add_argument("--executor", choices=("local", "slurm"), default="local",
                     help="where to train: this machine, or SLURM job arrays (default local)")
    run.add_argument("--workers", type=int, default=1,
                     help="local: runs trained at once on the CPU (default 1)")
    run.add_argument("--gpus", default=None,
                     help="local: comma-separated GPU indices, one slot per GPU (e.g. 0,1), or "
                     "--runs-per-gpu slots each")
    run.add_argument("--runs-per-gpu", default=None, metavar="K",
                     help="runs trained at once on one GPU, as separate processes sharing it: a "
                     "whole number or auto (the largest run's memory estimate against the GPU's "
                     "memory, at most 8); default: the sweep file's runs_per_gpu, else the SLURM "
                     "profile's, else auto (see docs/sweep.md, 'Several runs per GPU')")
    run.add_argument("--profile", default=None,
                     help="slurm: site profile YAML (e.g. slurm/profiles/local.yaml)")
    run.add_argument("--pack", type=int, default=1,
                     help="slurm: runs trained one after another in each array task (default 1)")
    run.add_argument("--wait", action="store_true",
                     help="slurm: wait for the jobs, resubmitting failed runs within --max-retries")
    run.add_argument("--max-retries", type=int, default=2,
                     help="times a failed run is started again before it is reported (default 2)")
    run.add_argument("--no-progress", action="store_true", help="local: no progress bar")
    run.add_argument("--no-fork-server", action="store_true",
                     help="local: start every run in a fresh Python process instead of forking it "
                     "from a warm one that has imported torch (slower start-up, same results)")
    run.set_defaults(func=run_handler)

    status = sub.add_parser("status", help="progress, failures and ETA of a sweep directory")
    status.add_argument("sweep_dir", help="the --sweep-dir given to `testbed sweep run`")
    status.add_argument("--json", action="store_true",
                        help="print JSON: {\"counts\": {state: n}, \"runs\": [...], ...}")
    status.set_defaults(func=status_handler)

    sweep.set_defaults(func=lambda args: (sweep.print_help(), 2)[1])


def plan_handler(args: argparse.Namespace) -> int:
    from testbed.sweep.plan import plan_report, render_plan
    from testbed.sweep.spec import load_sweep

    report = plan_report(load_sweep(args.sweep), args.device, args.mfu, args.peak_flops)
    print(json.dumps(report, indent=1) if args.json else render_plan(report))
    return 0


def run_handler(args: argparse.Namespace) -> int:
    from testbed.sweep.registry import Registry
    from testbed.sweep.spec import load_sweep

    if args.max_retries < 0:
        raise TestbedError(f"--max-retries={args.max_retries} must be 0 or more")
    if args.workers < 1:
        raise TestbedError(f"--workers={args.workers} must be at least 1")
    if args.pack < 1:
        raise TestbedError(f"--pack={args.pack} must be at least 1")
    if args.runs_per_gpu is not None:
        from testbed.sweep.spec import runs_per_gpu_setting

        args.runs_per_gpu = runs_per_gpu_setting(args.runs_per_gpu, "--runs-per-gpu")
    sweep = load_sweep(args.sweep)  # every config is validated before anything is written
    profile = None
    if args.executor == "slurm":
        from testbed.sweep.slurm import load_profile, require_slurm

        if not args.profile:
            raise TestbedError("--executor slurm needs --profile FILE, e.g. "
                               "--profile slurm/profiles/local.yaml")
        profile = load_profile(args.profile)
        require_slurm()
    sweep_dir = Path(args.sweep_dir or Path("sweeps") / sweep.name)
    check_sweep_dir(sweep_dir, sweep.name)
    registry = Registry(sweep_dir)
    run_ids = registry.add_runs(sweep)

    if args.executor == "local":
        from testbed.sweep.local import LocalExecutor, gpu_memory_bytes
        from testbed.sweep.spec import sweep_runs_per_gpu

        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
        runs_per_gpu = 1
        if args.runs_per_gpu is not None and not gpus:
            print("--runs-per-gpu applies to the slots of --gpus; on the CPU --workers sets the "
                  "runs trained at once", file=sys.stderr)
        if gpus:
            setting = args.runs_per_gpu if args.runs_per_gpu is not None else sweep.runs_per_gpu
            runs_per_gpu = sweep_runs_per_gpu(sweep, gpu_memory_bytes(gpus) if setting == "auto"
                                              else None, setting)
            if runs_per_gpu > 1:
                print(f"{runs_per_gpu} runs per GPU ({setting}) on GPU {','.join(gpus)}", flush=True)
        counts = LocalExecutor(registry, run_ids, workers=args.workers, gpus=gpus,
                               max_retries=args.max_retries, progress=not args.no_progress,
                               fork_server=not args.no_fork_server,
                               runs_per_gpu=runs_per_gpu).run()
    else:
        from testbed.sweep import slurm

        assert profile is not None  # loaded above for --executor slurm
        runs_per_gpu = slurm.packed_per_task(profile, sweep, args.runs_per_gpu)
        if runs_per_gpu > 1:
            print(f"{runs_per_gpu} runs at once per array task", flush=True)
        submitted = slurm.submit(registry, sweep.name, run_ids, profile, pack=args.pack,
                                 max_retries=args.max_retries, runs_per_gpu=runs_per_gpu)
        print(f"submitted {len(submitted)} of {len(run_ids)} runs "
              f"({len(run_ids) - len(submitted)} done, queued or out of retries)")
        if not args.wait:
            return 0
        counts = slurm.wait(registry, sweep.name, run_ids, profile, pack=args.pack,
                            max_retries=args.max_retries, on_poll=print_changes(),
                            runs_per_gpu=runs_per_gpu)
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    print(f"sweep {sweep.name}: {summary}; details: testbed sweep status {sweep_dir}")
    return 0 if counts.get("done", 0) == len(run_ids) else 1


def print_changes() -> Callable[[list[dict]], None]:
    """A polling callback that prints the count of runs per state whenever it changes."""
    last: list[str] = []

    def report(records: list[dict]) -> None:
        counts: dict[str, int] = {}
        for record in records:
            counts[record["state"]] = counts.get(record["state"], 0) + 1
        line = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        if [line] != last:
            print(f"waiting: {line}", flush=True)
            last[:] = [line]

    return report


def check_sweep_dir(sweep_dir: Path, name: str) -> None:
    """One sweep directory holds one sweep: refuse to mix two under the same registry."""
    marker = sweep_dir / "sweep.json"
    if marker.is_file():
        from testbed.rundir import read_json

        known = (read_json(marker) or {}).get("name")
        if known != name:
            raise TestbedError(f"--sweep-dir {str(sweep_dir)!r} holds sweep {known!r}, not "
                               f"{name!r}; choose another --sweep-dir")
        return
    sweep_dir.mkdir(parents=True, exist_ok=True)
    from testbed.rundir import write_json_atomic

    write_json_atomic(marker, {"name": name})


def status_handler(args: argparse.Namespace) -> int:
    from testbed.sweep.registry import Registry
    from testbed.sweep.status import collect, render_status

    report = collect(Registry(args.sweep_dir))
    print(json.dumps(report, indent=1) if args.json else render_status(report))
    sys.stdout.flush()
    return 1 if report["counts"].get("damaged") else 0  # damaged registry records: see the rows
