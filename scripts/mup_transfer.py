#!/usr/bin/env python
"""Learning-rate transfer under SP and µP: train a grid of learning rates at a narrow and a wide
width and see whether the best learning rate stays put.

Each run trains the config's model (default: 2 layers, 4 heads, seq 64, 512 tokens a step, the
built-in synthetic language at 32 tokens, cosine schedule with 10% warmup) at d_model = each
width with n_heads kept, under SP and under µP with the narrowest width as µP's base, and scores
it by its validation loss at the end, on the same 64 held-out windows for every run. At the base
width µP is SP exactly, so that width is trained once. Under µP the best grid point should be
the same at every width; under SP it should move to smaller learning rates as the width grows.
The result table, the best lr per width and the verdict are printed (and written as JSON with
--json).

    nice -n 10 python scripts/mup_transfer.py --workers 2           # widths 32,256, 5 lrs, 200 steps
    python scripts/mup_transfer.py --widths 64,512 --lrs 1e-3,3e-3,1e-2 --steps 300 --json out.json
    python scripts/mup_transfer.py configs/smoke.yaml model.n_layers=4 --widths 64,256
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import sys
import time

# The synthetic language at 32 tokens with small supports: a small model leaves the unigram
# plateau within a hundred steps (at the default 128 tokens it is still on it after 300).
DEFAULTS = {"model.n_layers": 2, "model.n_heads": 4, "model.max_seq_len": 64, "data.seq_len": 64,
            "data.synthetic": {"vocab_size": 32, "support_order1": 4, "support_order2": 4, "support_order3": 4,
                               "lam": 0.3},
            "train.global_batch_tokens": 512, "schedule": {"name": "cosine", "warmup_fraction": 0.1}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="YAML config (default: the small model above)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--widths", default="32,256", help="comma-separated d_model values; the first is µP's base")
    p.add_argument("--lrs", default="1.25e-3,3.54e-3,1e-2,2.83e-2,8e-2",
                   help="comma-separated peak lrs (default: 5, a factor 2^1.5 apart)")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps per run (default 200)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker (default 1)")
    p.add_argument("--workers", type=int, default=1, help="runs trained at once, one process each (default 1)")
    p.add_argument("--json", help="write the rows, best lrs and verdict here")
    args = p.parse_args(argv)

    import torch

    from testbed.config import load_config
    from testbed.train.mup import best_lrs, lr_shift

    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    lrs = sorted(float(x) for x in args.lrs.split(","))
    config = load_config(args.config, args.overrides) if args.config else load_config(None, DEFAULTS)
    # At the base width µP is SP exactly (tests/test_mup.py), so that width is trained once.
    points = [("sp", w, lr) for w in widths for lr in lrs] + [("mup", w, lr) for w in widths[1:] for lr in lrs]
    t0 = time.time()
    rows = []
    with multiprocessing.get_context("fork").Pool(args.workers, torch.set_num_threads, (args.threads,)) as pool:
        for row in pool.imap(functools.partial(train_point, config, args.steps, widths[0]), points):
            rows.append(row)
            print(f"  {row['parametrization']:<4} d_model {row['width']:>5}  lr {row['lr']:<8.3g} "
                  f"loss {row['loss']:.4f}  ({time.time() - t0:.0f}s)", flush=True)
    rows += [dict(r, parametrization="mup") for r in rows if r["width"] == widths[0]]
    print(transfer_table(rows, widths, lrs))
    best = best_lrs(rows)
    shifts = {k: lr_shift(rows, k, lrs) for k in ("sp", "mup")}
    verdict = transfer_verdict(shifts)
    print("best lr: " + "; ".join(f"{k} d_model {w}: {lr:g}" for (k, w), lr in sorted(best.items())))
    print(f"shift of the best lr from d_model {widths[0]} to {widths[-1]}: SP {shifts['sp']:+d} grid points, "
          f"µP {shifts['mup']:+d}")
    print(verdict)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": sys.argv, "widths": widths, "lrs": lrs, "steps": args.steps, "rows": rows,
                       "best_lr": {f"{k} {w}": lr for (k, w), lr in best.items()}, "shift": shifts,
                       "verdict": verdict, "wall_s": round(time.time() - t0)}, f, indent=1)
    return 0


def train_point(config, steps: int, base_width: int, point: tuple[str, int, float]) -> dict:
    from testbed.train.mup import lr_point

    parametrization, width, lr = point
    return lr_point(config, width, lr, steps, parametrization, base_width)


def transfer_table(rows: list[dict], widths: list[int], lrs: list[float]) -> str:
    """A markdown table: one row per (parametrization, width), one column per lr; the best loss
    of each row in bold."""
    lines = ["| param | d_model | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|---|" + "---|" * len(lrs)]
    for parametrization in ("sp", "mup"):
        for width in widths:
            loss = {r["lr"]: r["loss"] for r in rows if (r["parametrization"], r["width"]) == (parametrization, width)}
            best = min(loss.values())
            cells = [(f"**{loss[lr]:.4f}**" if loss[lr] == best else f"{loss[lr]:.4f}") for lr in lrs]
            lines.append(f"| {parametrization} | {width} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def transfer_verdict(shifts: dict[str, int]) -> str:
    mup = "µP kept the best lr at the same grid point" if shifts["mup"] == 0 else \
        f"µP moved the best lr by {shifts['mup']:+d} grid points"
    sp = "SP kept it at the same point" if shifts["sp"] == 0 else f"SP moved it by {shifts['sp']:+d}"
    return f"verdict: {mup}; {sp}."


if __name__ == "__main__":
    sys.exit(main())
