"""`testbed study list|run|report`. Heavy modules are imported inside the handlers only."""

from __future__ import annotations

import argparse

# testbed.study.base.SIZES, spelled out so that `testbed --help` imports nothing heavy (a test
# keeps the two equal)
SIZES = ("tiny", "cpu", "gpu", "gpu-min")


def register(subparsers: argparse._SubParsersAction) -> None:
    study = subparsers.add_parser("study", help="reproduce published findings with the testbed's own runs",
                                  description="Run a named study (sweeps, analysis, verdict) and report "
                                  "claim, measurement with interval and verdict (see docs/studies.md).")
    sub = study.add_subparsers(dest="study_command", metavar="ACTION")

    def imports(p: argparse.ArgumentParser) -> None:
        p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                       help="import this module first, so the studies it registers can be named (repeatable)")

    listing = sub.add_parser("list", help="every registered study with its claim")
    imports(listing)
    listing.set_defaults(func=list_handler)

    run = sub.add_parser("run", help="train the study's runs (skipping done ones), then report")
    run.add_argument("name", help="a study name (testbed study list)")
    run.add_argument("--size", choices=SIZES, default="tiny",
                     help="tiny: mechanics, < 1 min; cpu: a real result in <= 30 min on 2 cores; "
                     "gpu-min: <= 8 min of one H100/H200 on the installed Python sources (made there); "
                     "gpu: one H100 (cost the sweeps with testbed study plan) (default tiny)")
    run.add_argument("--out", required=True, help="folder for the sweeps and the report")
    run.add_argument("--workers", type=int, default=1, help="runs trained at once (default 1)")
    imports(run)
    run.set_defaults(func=run_handler)

    planning = sub.add_parser("plan", help="the study's runs, tokens, FLOPs and time, without training")
    planning.add_argument("name", help="a study name (testbed study list)")
    planning.add_argument("--size", choices=SIZES, default="cpu")
    planning.add_argument("--flops-per-s", type=float, default=None,
                          help="achieved training FLOP/s to estimate time with (default: the size's "
                          "measured rates by model width, see docs/studies.md#cost)")
    imports(planning)
    planning.set_defaults(func=plan_handler)

    report = sub.add_parser("report", help="re-analyse a finished study folder; trains nothing")
    report.add_argument("out", help="the --out of testbed study run")
    report.add_argument("--publish", metavar="DIR",
                        help="also write the report as DIR/NAME.md with its plots (DIR/NAME-*.png), headed by "
                        "the command, the machine and the wall time (e.g. docs/studies)")
    imports(report)
    report.set_defaults(func=report_handler)

    study.set_defaults(func=lambda args: (study.print_help(), 2)[1])


def list_handler(args: argparse.Namespace) -> int:
    from testbed.study.base import STUDIES
    from testbed.study.runner import load

    load(args.imports)
    for name, study in STUDIES.items():
        print(f"{name} (v{study.version}, sizes {', '.join(study.sizes)}): {study.claim}\n    {study.paper}")
    return 0


def run_handler(args: argparse.Namespace) -> int:
    from testbed.errors import TestbedError
    from testbed.study.runner import load, run

    if args.workers < 1:
        raise TestbedError(f"--workers={args.workers} must be at least 1")
    load(args.imports)
    figures = run(args.name, args.size, args.out, workers=args.workers)
    _summary(args.out, figures)
    return 0


def plan_handler(args: argparse.Namespace) -> int:
    from testbed.study.runner import load, plan
    from testbed.sweep.plan import duration, format_table, human

    load(args.imports)
    p = plan(args.name, args.size, args.flops_per_s)
    rows = [[r["sweep"], str(r["runs"]), human(r["tokens"]), human(r["flops"]),
             human(r["largest_fresh_tokens"]), human(r["corpus_tokens"]) if r["corpus_tokens"] else "-",
             duration(r["seconds"])] for r in p["sweeps"]]
    at = f"{human(p['rate'])}FLOP/s" if p["rate"] else "the size's measured rates"
    runs = sum(r["runs"] for r in p["sweeps"])
    flops = sum(r["flops"] for r in p["sweeps"])
    print(f"study {p['study']} ({p['size']}) at {at}: "
          f"{duration(p['seconds'])} of a {duration(p['budget_s'])} budget "
          f"({runs} runs, {human(flops)}FLOPs"
          + (f", {duration(p['startup_s'])} start-up included" if p["startup_s"] else "") + ")")
    print(format_table(["sweep", "runs", "tokens", "FLOPs", "largest run", "corpus", "time"], rows))
    if p["unprepared"]:
        each = {"gpu": "hours each: the hub sample is streamed and tokenised",
                "gpu-min": "a minute or two on 16 cores: the installed Python sources are read and tokenised"
                }.get(p["size"], "about a minute each on 2 cores")
        print(f"note: {len(p['unprepared'])} corpus folder(s) are prepared first by `study run` ({each}; "
              f"not in the time above); corpus sizes are lower estimates until then: "
              + ", ".join(p["unprepared"]))
    for r in p["sweeps"]:
        if r.get("bracket_runs_at_most"):
            print(f"note: sweep {r['sweep']} extends its LR grid where a cell's optimum lands at an edge: "
                  f"at most {r['bracket_runs_at_most']} more runs ({duration(r['bracket_seconds_at_most'])}), "
                  "not in the time above")
    for problem in p["problems"]:
        print(f"problem: {problem}")
    return 0 if not p["problems"] else 1


def report_handler(args: argparse.Namespace) -> int:
    from testbed.study.runner import load, report

    load(args.imports)
    figures = report(args.out, args.imports)
    _summary(args.out, figures)
    if args.publish:
        from testbed.study.runner import publish

        print(f"published: {publish(args.out, args.publish)}")
    return 0


def _summary(out: str, figures: dict) -> None:
    from testbed.study.base import Measurement

    print(f"study {figures['study']} ({figures['size']}): {Measurement(**figures['measured']).text()}")
    print(f"verdict: {figures['verdict']}: {figures['why']}")
    print(f"report: {out}/report.md")
