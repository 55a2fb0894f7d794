"""WSD with a 1-sqrt cooldown vs cosine (Hägele et al. 2024), and cooldown branches."""

from __future__ import annotations

from typing import Any

from testbed.study.base import Analysis, Context, Measurement, Study, figure, register, relative_gap, tuned
from testbed.study.recipes import BATCH, base, seeds, with_schedule

TOLERANCE = 0.01  # WSD may be at most 1% above cosine, at its own tuned learning rate
DECAY = 0.2
# Cooldown shapes branched from the long run: the claimed one, and the linear one it should beat.
BRANCH_SHAPES = ("1-sqrt", "linear")


def durations(size: str) -> list[int]:
    steps = {"tiny": [16, 32], "cpu": [64, 128, 256], "gpu": [2000, 4000, 8000]}[size]
    return [s * BATCH[size] for s in steps]


def lrs(size: str) -> list[float]:
    return {"tiny": [3e-3, 1e-2], "cpu": [3e-3, 6e-3, 1.2e-2],
            "gpu": [5e-4, 1e-3, 2e-3, 4e-3]}[size]


def sweeps(size: str) -> list[dict[str, Any]]:
    arms = {"cosine": {"name": "cosine", "min_lr_ratio": 0.1},
            "wsd": {"name": "wsd", "min_lr_ratio": 0.0, "decay_fraction": DECAY, "decay_shape": "1-sqrt"}}
    return [{"name": f"wsd-{arm}", "base": with_schedule(base(size), **schedule),
             "grid": {"train.tokens": durations(size), "optim.lr": lrs(size), "train.seed": seeds(size)},
             "labels": ["train.tokens", "optim.lr", "train.seed"]}
            for arm, schedule in arms.items()]


def long_sweep(size: str, lr: float) -> dict[str, Any]:
    """One WSD run per seed at the longest duration, with checkpoints where branches start."""
    tree = with_schedule(base(size), name="wsd", min_lr_ratio=0.0, decay_fraction=DECAY,
                         decay_shape="1-sqrt")
    tree["optim"]["lr"] = lr
    tree["train"]["tokens"] = durations(size)[-1]
    tree["checkpoint"] = {"at_tokens": [s * BATCH[size] for s in branch_steps(size)]}
    return {"name": "wsd-long", "base": tree, "grid": {"train.seed": seeds(size)}, "labels": ["train.seed"]}


def branch_steps(size: str) -> list[int]:
    """A branch from step S decaying over 20% ends at S / 0.8: the shorter durations' steps."""
    return [round((1 - DECAY) * d / BATCH[size]) for d in durations(size)[:-1]]


def extra_cost(size: str) -> list[dict[str, Any]]:
    """What `extra` trains, for `study plan`: the long runs, and each branch's decay as a run of
    its length (a branch trains DECAY x its end's tokens)."""
    branches = with_schedule(base(size), name="constant")
    ends = durations(size)[:-1]
    return [long_sweep(size, lrs(size)[0]),
            {"name": "wsd-branches", "base": branches,
             "grid": {"train.tokens": [round(DECAY * d / BATCH[size]) * BATCH[size] for d in ends],
                      # one stand-in per (seed, cooldown shape): costs are all the plan reads
                      "train.seed": list(range(len(seeds(size)) * len(BRANCH_SHAPES)))}}]


def extra(ctx: Context, options: dict[str, Any]) -> None:
    """Train the long WSD run at the tuned LR of the longest WSD arm, then branch it with each
    cooldown shape."""
    from testbed.rundir import RunDir
    from testbed.study.sweeps import run_sweep
    from testbed.train.branch import branch

    arm = tuned(ctx.finals("wsd-wsd"), ["planned_tokens"])
    lr = float(arm.loc[arm["planned_tokens"] == arm["planned_tokens"].max(), "peak_lr"].iloc[0])
    folder = run_sweep(ctx.out, long_sweep(ctx.size, lr), workers=options.get("workers", 1),
                       servers=options.get("servers"))
    ctx.sweep_dirs["wsd-long"] = folder
    for parent in sorted((folder / "runs").iterdir()):
        for step in branch_steps(ctx.size):
            for shape in BRANCH_SHAPES:
                child = RunDir(parent / "branches" / f"step{step}_decay{DECAY:g}_{shape}")
                if (child.read_status() or {}).get("state") == "done":
                    continue
                branch(parent, step, DECAY, shape)


def analyse(ctx: Context) -> Analysis:
    import pandas as pd

    cells = ["planned_tokens"]
    cos = tuned(ctx.finals("wsd-cosine"), cells)
    wsd = tuned(ctx.finals("wsd-wsd"), cells)
    rows, gaps = [], []
    for tokens in sorted(set(cos["planned_tokens"]) & set(wsd["planned_tokens"])):
        a = wsd.loc[wsd["planned_tokens"] == tokens]
        b = cos.loc[cos["planned_tokens"] == tokens]
        gap = relative_gap(a["loss"].tolist(), b["loss"].tolist())
        gap.name = f"WSD vs cosine at D={tokens:.3g}"
        gaps.append(gap)
        rows.append({"tokens": int(tokens), "cosine_lr": float(b["peak_lr"].iloc[0]),
                     "cosine_loss": float(b["loss"].mean()), "wsd_lr": float(a["peak_lr"].iloc[0]),
                     "wsd_loss": float(a["loss"].mean()), "gap": gap.value, "gap_low": gap.low,
                     "gap_high": gap.high})
    worst = max(gaps, key=lambda m: m.high if m.high is not None else m.value)
    headline = Measurement(f"largest relative loss gap WSD − cosine ({worst.name.split(' at ')[1]})",
                           worst.value, worst.low, worst.high, "", worst.how)
    more = [g for g in gaps if g is not worst]
    branch_rows = []
    shape_rows = []
    if "wsd-long" in ctx.sweep_dirs and ctx.sweep_dirs["wsd-long"].is_dir():
        every = ctx.finals("wsd-long")
        linear = every["run_dir"].astype(str).str.endswith("_linear")
        points = every[~linear]
        for tokens in sorted(set(every.loc[linear, "D"])):  # 1-sqrt against linear, branch for branch
            a = points.loc[points["D"] == tokens, "loss"].tolist()
            b = every.loc[linear & (every["D"] == tokens), "loss"].tolist()
            gap = relative_gap(a, b)
            gap.name = f"1-sqrt vs linear cooldown branch at D={tokens:.3g}"
            more.append(gap)
            shape_rows.append({"tokens": int(tokens), "sqrt_loss": sum(a) / len(a), "linear_loss": sum(b) / len(b),
                               "gap": gap.value, "gap_low": gap.low, "gap_high": gap.high})
        for tokens in sorted(set(points["D"])):
            br = points.loc[points["D"] == tokens]
            arm = wsd.loc[(wsd["planned_tokens"] - tokens).abs() <= BATCH[ctx.size]]
            if arm.empty:
                continue
            gap = relative_gap(br["loss"].tolist(), arm["loss"].tolist())
            gap.name = f"branch vs separate WSD run at D={tokens:.3g}"
            more.append(gap)
            branch_rows.append({"tokens": int(tokens), "kind": ",".join(sorted(set(br["point_kind"]))),
                                "branch_loss": float(br["loss"].mean()), "wsd_run_loss": float(arm["loss"].mean()),
                                "gap": gap.value, "gap_low": gap.low, "gap_high": gap.high})
    plots = [_plot(ctx, pd.DataFrame(rows), pd.DataFrame(branch_rows))]
    return Analysis(headline, more, {"tuned arms": rows, "branches": branch_rows, "cooldown shapes": shape_rows},
                    plots, [f"tolerance: WSD at most {TOLERANCE:.0%} above cosine; branches within ±{TOLERANCE:.0%}; "
                            "1-sqrt branches below linear ones (interval under 0)"])


def _plot(ctx: Context, arms, branches) -> str:
    with figure(ctx.out / "wsd.png", "training tokens D") as ax:
        ax.plot(arms["tokens"], arms["cosine_loss"], "o-", label="cosine (tuned LR)")
        ax.plot(arms["tokens"], arms["wsd_loss"], "s-", label="WSD 1-sqrt 20% (tuned LR)")
        if len(branches):
            ax.plot(branches["tokens"], branches["branch_loss"], "x--", label="cooldown branches")
    return "wsd.png"


def below_zero(m: Measurement) -> str:
    """1-sqrt beats linear: agree when the whole interval of the gap is below 0, disagree when above."""
    if m.value is None or m.low is None or m.high is None:
        return "inconclusive"
    return "agree" if m.high < 0 else "disagree" if m.low > 0 else "inconclusive"


def verdict(analysis: Analysis) -> tuple[str, str]:
    from testbed.study.base import at_most, combine, within

    checks = [(m, at_most(m, TOLERANCE)) for m in [analysis.headline] + analysis.more if "cosine" in m.name]
    checks += [(m, within(m, TOLERANCE)) for m in analysis.more if m.name.startswith("branch")]
    checks += [(m, below_zero(m)) for m in analysis.more if m.name.startswith("1-sqrt")]
    # Name what fails and in which direction: a branch may fail by being better, not only worse.
    failing = "; ".join(f"{m.name}: {m.value:+.1%} [{m.low:+.1%}, {m.high:+.1%}]"
                        for m, part in checks if part == "disagree")
    return combine([part for _, part in checks],
                   disagree=f"outside the tolerance (WSD at most +{TOLERANCE:.0%} over cosine, branches within "
                            f"±{TOLERANCE:.0%} of a separate run, 1-sqrt below linear), interval included: {failing}",
                   agree="every duration's interval lies within the tolerance, branches included",
                   inconclusive="some interval straddles the tolerance or is missing (one seed)")


register(Study(
    name="wsd", version=1,
    paper="Hägele et al. 2024, Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations",
    claim="A constant LR with a 1-sqrt cooldown over the last 20% (WSD) matches cosine at every training "
          "duration, each at its own tuned LR; cooldown branches of one long WSD run trace the same frontier; "
          "a 1-sqrt cooldown beats a linear one.",
    sweeps=sweeps, analyse=analyse, verdict=verdict, extra=extra, extra_cost=extra_cost,
    caveat="The LR grid is coarse (the optimum may fall between points), small models and short runs "
           "give the cooldown few steps, and two seeds make a crude interval.",
))
