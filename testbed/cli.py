"""The `testbed` command.

Each subsystem owns a small `cli.py` with a `register(subparsers)` function that adds its
subcommand(s) and sets `func` on the parser. Those modules import nothing heavy at module level
(no torch, no transformers), so `testbed --help` answers at once; the handler imports what it
needs when it runs. A handler returns the process exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from testbed.errors import TestbedError

# Order is the order in `testbed --help`.
SUBSYSTEMS = (
    "testbed.train.cli",
    "testbed.data.cli",
    "testbed.sweep.cli",
    "testbed.fit.cli",
    "testbed.fit.reporting.plot_cli",  # testbed plot: loss curves of a run or a sweep
    "testbed.study.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testbed",
        description="Train ladders of small decoder transformers, sweep them locally or on SLURM, "
        "and fit scaling laws to the results.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBSYSTEMS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real import error inside the module: surface it
                raise
            continue
        module.register(sub)
    return parser


def report_error(err: TestbedError) -> None:
    """Our error, once. Under torchrun (and `accelerate launch`, torchrun underneath) every rank
    writes it to the launcher's error file, so the failure table names it instead of a hint to
    enable tracebacks, and the first rank of the node to fail prints it: the launcher stops the
    others as soon as one exits, so a rank waiting for another's word may never print. Without a
    launcher collecting errors, rank 0 prints it and any other rank prints it with its rank."""
    import json
    import os
    import time

    line = f"error: {err}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    first = os.environ.get("RANK", "0") == "0"
    rank_dir = os.path.dirname(error_file or "")
    attempt_dir = os.path.dirname(rank_dir)
    if os.path.basename(rank_dir).isdigit() and os.path.basename(attempt_dir).startswith("attempt_"):
        # The launcher gives each local rank attempt_K/<local rank>/error.json: their shared
        # attempt folder holds one claim, taken by whichever rank gets here first. (An error
        # file laid out otherwise, set by hand, leaves the printing to rank 0.)
        claim = os.path.join(attempt_dir, "testbed-error-reported")
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            first = True
        except FileExistsError:
            first = False
        except OSError:
            pass  # no claim possible: rank 0 prints, as without a launcher
    if first:
        print(line, file=sys.stderr, flush=True)
    if error_file:
        record = {"message": {"message": f"{type(err).__name__}: {err}",
                              "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
        try:
            with open(error_file, "w") as f:
                json.dump(record, f)
            return
        except OSError:
            pass
    if not first:
        print(f"error (rank {os.environ.get('RANK')}): {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may come after options (`train CFG --run-dir D lr=...`): argparse stops
    # collecting a positional list at the first option, so gather the rest here.
    if extra and isinstance(getattr(args, "overrides", None), list):
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    from testbed import exits

    try:
        code = int(args.func(args) or 0)
    except TestbedError as err:
        report_error(err)
        # Bad input, or an error with a code of its own (a busy run directory: exits.BUSY).
        code = int(getattr(err, "exit_code", exits.BAD_INPUT))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    return exits.leave(code)  # a torchrun rank ends here (exits.skip_finalization)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
