"""WSD with a 1-sqrt cooldown vs cosine (Hägele et al. 2024), cooldown branches, and the long
run's weight EMA against them."""

from __future__ import annotations

from typing import Any

import numpy as np

from testbed.stats import paired_noise, relative_gap
from testbed.study.base import (
    SIZES,
    Analysis,
    Bracket,
    Context,
    Measurement,
    Study,
    choose,
    decidable,
    figure,
    measured,
    paired_by_seed,
    register,
    upper_end,
)
from testbed.study.recipes import BATCH, seeds, small_vocab_base

TOLERANCE = 0.01  # WSD may be at most 1% above cosine, at its own tuned learning rate
DECAY = 0.2
# Cooldown shapes branched from the long run: the claimed one, and the linear one it should beat.
BRANCH_SHAPES = ("1-sqrt", "linear")
ARMS = {"cosine": {"name": "cosine", "min_lr_ratio": 0.1},
        "wsd": {"name": "wsd", "min_lr_ratio": 0.0, "decay_fraction": DECAY, "decay_shape": "1-sqrt"}}
# Warmup in steps, the same at every duration: a branch of the long run is then the separate WSD
# run of its length up to its cooldown (Hägele et al.'s protocol). v2's 5% of each run warmed the
# short runs over 3-6 steps and the branches over 13.
WARMUP_STEPS = {"tiny": 2, "cpu": 20, "gpu-min": 30, "gpu": 100}
# cpu: a 512-token BPE and d_model 32 in 3 layers (37k non-embedding parameters, where v2's d_model
# 64 in 4 layers on the 4096-token BPE had 197k), so the runs reach 9-36 tokens per non-embedding
# parameter (v2: 0.7-2.7), nearer the noise-limited regime the schedule claims are about.
CPU_MODEL = {"d_model": 32, "n_layers": 3, "n_heads": 2}


def durations(size: str) -> list[int]:
    # Steps divisible by 5: a branch from 80% of a duration ends exactly at it.
    # gpu-min: two durations and two LRs, so the runs' start-up (12 s each) leaves compute in 8 min
    steps = {"tiny": [20, 40], "cpu": [160, 320, 640], "gpu-min": [600, 1200], "gpu": [2000, 4000, 8000]}[size]
    return [s * BATCH[size] for s in steps]


def lrs(size: str) -> list[float]:
    # cpu: four points a factor 2 apart, as the optimum moves with the duration: v2's was 6e-3 at
    # d_model 64 (3e-3 once, at the grid's bottom); the optimizers study's AdamW chose 1.2e-2 at
    # d_model 32 on this BPE (from 4e-3, 1.2e-2, 3.6e-2); longer runs move it down. gpu-min's two
    # points cannot bracket (a third LR does not fit its 8 minutes): an edge there is named, and
    # no rule rests on it.
    return {"tiny": [3e-3, 1e-2], "cpu": [4e-3, 8e-3, 1.6e-2, 3.2e-2], "gpu-min": [2e-3, 5e-3],
            "gpu": [5e-4, 1e-3, 2e-3, 4e-3]}[size]


def brackets(size: str) -> dict[str, Bracket]:
    """Each arm's LR extended where a duration's optimum lands at an edge (testbed.study.bracket);
    not at gpu-min, whose two LRs are all its 8 minutes hold, nor tiny's minute."""
    if size in ("tiny", "gpu-min"):
        return {}
    return {f"wsd-{arm}": Bracket({"optim.lr": "log"}) for arm in ARMS}


# The long run's last-K checkpoint average at each branch's end: K checkpoints spread evenly over
# the last 20% of that duration (the steps its branch spends cooling down), the newest at the end.
AVERAGE_LAST = 4


def branch_ends(size: str) -> list[int]:
    """The long run's steps where its cooldown branches end: the shorter durations' ends."""
    return [d // BATCH[size] for d in durations(size)[:-1]]


def average_steps(size: str) -> list[int]:
    """The long run's steps saved for the averages: for each branch end e, e·(1 − DECAY·j/K) for
    j = K−1 … 0 (cpu, e = 160: 136, 144, 152, 160)."""
    return sorted({round(e * (1 - DECAY * j / AVERAGE_LAST)) for e in branch_ends(size) for j in range(AVERAGE_LAST)})


def ema_decay(size: str) -> float:
    """The long run's weight EMA decay: a time constant of the shortest cooldown's steps, so the
    EMA averages over about as many steps as that branch spends cooling down."""
    return 1 - 1 / (DECAY * durations(size)[0] / BATCH[size])


def _tree(size: str, **schedule: Any) -> dict[str, Any]:
    tree = small_vocab_base(size)
    if size == "cpu":
        tree["model"].update(CPU_MODEL)
    tree["schedule"] = {"warmup_steps": WARMUP_STEPS[size], **schedule}
    return tree


def sweeps(size: str) -> list[dict[str, Any]]:
    return [{"name": f"wsd-{arm}", "base": _tree(size, **schedule),
             "grid": {"train.tokens": durations(size), "optim.lr": lrs(size), "train.seed": seeds(size)},
             "labels": ["train.tokens", "optim.lr", "train.seed"]}
            for arm, schedule in ARMS.items()]


def long_sweep(size: str, lr: float) -> dict[str, Any]:
    """One WSD run per seed at the longest duration, with checkpoints where branches start and
    end and over each branch's window (for the last-K averages), and an EMA of its weights evaluated
    at each (val_loss_ema): at a branch's end, weight averaging without a cooldown against the
    cooldown (Hägele et al. §4). The EMA is a copy beside the weights; the run itself is the longest
    WSD arm's."""
    tree = _tree(size, **ARMS["wsd"])
    tree["optim"]["lr"] = lr
    tree["train"].update(tokens=durations(size)[-1], ema_decay=ema_decay(size))
    steps = sorted({*branch_steps(size), *branch_ends(size), *average_steps(size)})
    tree["checkpoint"] = {"at_tokens": [s * BATCH[size] for s in steps]}
    return {"name": "wsd-long", "base": tree, "grid": {"train.seed": seeds(size)}, "labels": ["train.seed"]}


def branch_steps(size: str) -> list[int]:
    """A branch from step S decaying over 20% ends at S / 0.8: the shorter durations' steps."""
    return [round((1 - DECAY) * e) for e in branch_ends(size)]


def extra_cost(size: str) -> list[dict[str, Any]]:
    """What `extra` trains, for `study plan`: the long runs, and each branch's decay as a run of
    its length (a branch trains DECAY x its end's tokens)."""
    branches = _tree(size)
    branches["schedule"] = {"name": "constant"}  # the decay's cost: no warmup
    ends = durations(size)[:-1]
    return [long_sweep(size, lrs(size)[0]),
            {"name": "wsd-branches", "base": branches,
             "grid": {"train.tokens": [round(DECAY * d / BATCH[size]) * BATCH[size] for d in ends],
                      # one stand-in per (seed, cooldown shape): costs are all the plan reads
                      "train.seed": list(range(len(seeds(size)) * len(BRANCH_SHAPES)))}}]


def extra(ctx: Context, options: dict[str, Any]) -> None:
    """Train the long WSD run at the tuned LR of the longest WSD arm, branch it with each
    cooldown shape, and average its last AVERAGE_LAST checkpoints up to each branch's end (no
    training: the average is evaluated and recorded in the run's averages.jsonl)."""
    from testbed.rundir import RunDir
    from testbed.study.sweeps import run_sweep
    from testbed.train.average import average_checkpoints
    from testbed.train.branch import branch

    cells = choose(ctx.finals("wsd-wsd"), ["planned_tokens"]).cells
    lr = float(cells.loc[cells["planned_tokens"] == cells["planned_tokens"].max(), "lr"].iloc[0])
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
        done = {(r["step"], r["last"]) for r in RunDir(parent).averages()}
        for end in branch_ends(ctx.size):
            if (end, AVERAGE_LAST) not in done:
                average_checkpoints(parent, AVERAGE_LAST, until=end)


def analyse(ctx: Context) -> Analysis:
    import pandas as pd

    cos_choice = choose(ctx.finals("wsd-cosine"), ["planned_tokens"])
    wsd_choice = choose(ctx.finals("wsd-wsd"), ["planned_tokens"])
    cos, wsd = cos_choice.rows, wsd_choice.rows
    durations = sorted(set(cos["planned_tokens"]) & set(wsd["planned_tokens"]))
    # Both arms at one seed share its initialisation and data order: the gap is paired by seed,
    # and the variance of the per-seed log ratio is pooled over the durations.
    pairs = {t: paired_by_seed(wsd[wsd["planned_tokens"] == t], cos[cos["planned_tokens"] == t]) for t in durations}
    noise = paired_noise(pairs.values())
    rows, gaps = [], []
    for tokens in durations:
        edges = cos_choice.edges({"planned_tokens": tokens}) + wsd_choice.edges({"planned_tokens": tokens})
        gap = measured(f"WSD vs cosine at D={tokens:.3g}", relative_gap(*pairs[tokens], noise, paired=True),
                       caveats=edges)
        gaps.append(gap)
        lr = {name: float(c.cells.loc[c.cells["planned_tokens"] == tokens, "lr"].iloc[0])
              for name, c in (("cosine", cos_choice), ("wsd", wsd_choice))}
        rows.append({"tokens": int(tokens), "cosine_lr": lr["cosine"], "cosine_loss": float(np.mean(pairs[tokens][1])),
                     "wsd_lr": lr["wsd"], "wsd_loss": float(np.mean(pairs[tokens][0])), "gap": gap.value,
                     "gap_low": gap.low, "gap_high": gap.high})
    worst = max(gaps, key=upper_end)
    headline = Measurement(f"largest relative loss gap WSD − cosine ({worst.name.split(' at ')[1]})",
                           worst.value, worst.low, worst.high, "", worst.how, worst.caveat)
    more = [g for g in gaps if g is not worst]
    branch_rows: list[dict[str, Any]] = []
    shape_rows: list[dict[str, Any]] = []
    average_rows: list[dict[str, Any]] = []
    if "wsd-long" in ctx.sweep_dirs and ctx.sweep_dirs["wsd-long"].is_dir():
        every = ctx.finals("wsd-long")
        # Only the branches: the long run's own end is the longest WSD arm itself, a comparison
        # that cannot fail.
        every = every[every["run_dir"].astype(str).str.contains("/branches/")]
        every = every.assign(parent=every["run_dir"].astype(str).str.rsplit("/branches/", n=1).str[0])
        linear = every["run_dir"].astype(str).str.endswith("_linear")
        sqrt = every[~linear]
        shape_pairs = {}
        for tokens in sorted(set(every.loc[linear, "D"])):  # 1-sqrt against linear, paired by parent
            a = sqrt[sqrt["D"] == tokens].set_index("parent")["loss"]
            b = every[linear & (every["D"] == tokens)].set_index("parent")["loss"]
            shared = sorted(set(a.index) & set(b.index))
            shape_pairs[tokens] = ([float(a[p]) for p in shared], [float(b[p]) for p in shared])
        shape_noise = paired_noise(shape_pairs.values())
        for tokens, (a, b) in shape_pairs.items():
            gap = measured(f"1-sqrt vs linear cooldown branch at D={tokens:.3g}",
                           relative_gap(a, b, shape_noise, paired=True))
            more.append(gap)
            shape_rows.append({"tokens": int(tokens), "sqrt_loss": float(np.mean(a)), "linear_loss": float(np.mean(b)),
                               "gap": gap.value, "gap_low": gap.low, "gap_high": gap.high})
        branch_pairs = {}
        for tokens in sorted(set(sqrt["D"])):
            arm = wsd.loc[(wsd["planned_tokens"] - tokens).abs() <= BATCH[ctx.size]]
            if not arm.empty:
                branch_pairs[tokens] = (paired_by_seed(sqrt[sqrt["D"] == tokens], arm), arm)
        branch_noise = paired_noise(p for p, _ in branch_pairs.values())
        for tokens, ((a, b), arm) in branch_pairs.items():
            gap = measured(f"branch vs separate WSD run at D={tokens:.3g} (a check of construction, not in the rule)",
                           relative_gap(a, b, branch_noise, paired=True),
                           caveats=wsd_choice.edges({"planned_tokens": arm["planned_tokens"].iloc[0]}))
            more.append(gap)
            branch_rows.append({"tokens": int(tokens), "branch_loss": float(np.mean(a)), "wsd_run_loss": float(np.mean(b)),
                                "gap": gap.value, "gap_low": gap.low, "gap_high": gap.high})
        averaged, average_rows = _averaging(ctx, sqrt)
        more.extend(averaged)
    plots = [_plot(ctx, pd.DataFrame(rows), pd.DataFrame(branch_rows), pd.DataFrame(average_rows))]
    return Analysis(headline, more, {"tuned arms": rows, "branches": branch_rows, "cooldown shapes": shape_rows,
                                     "weight averaging": average_rows},
                    plots, [f"tolerance: WSD at most {TOLERANCE:.0%} above cosine; 1-sqrt branches below linear ones "
                            "(interval under 0)",
                            "branches: with warmup in steps and the data order set by the step, a cooldown branch of "
                            "the long run is its separate WSD run of that length, so the two must agree exactly; "
                            "the paper's frontier claim holds here by construction and checks the testbed, not the "
                            "science (not in the rule)",
                            f"learning rates: {cos_choice.method}",
                            "weight averaging (beside the claim, not in the rule): the long run's EMA of its weights, "
                            f"and the mean of its last {AVERAGE_LAST} checkpoints over the branch's last 20%, at a "
                            "branch's end against that 1-sqrt branch, paired by seed; 'recovered' is the share of the "
                            "cooldown's drop from the long run's own weights that the average reaches"])


def _averaging(ctx: Context, sqrt) -> tuple[list[Measurement], list[dict[str, Any]]]:
    """The long run's weight EMA (val_loss_ema) at each branch's end against the 1-sqrt branch
    ending there, paired by parent run (Hägele et al. 2024, §4: averaging instead of a cooldown,
    at no extra training)."""
    points = ctx.points("wsd-long")
    points = points[~points["run_dir"].astype(str).str.contains("/branches/")]
    points = points.assign(parent=points["run_dir"].astype(str))
    kinds = points["point_kind"]
    raw = points[(kinds != "ema") & (kinds != "average")]
    decay = points.loc[kinds == "ema", "ema_decay"].dropna()
    averages = points[kinds == "average"]
    averages = averages[averages["average_last"] == AVERAGE_LAST] if "average_last" in averages else averages.iloc[:0]
    methods = {"ema": (f"weight EMA (decay {float(decay.iloc[0]):.4g})" if len(decay) else "weight EMA",
                       points[kinds == "ema"]),
               "average": (f"last-{AVERAGE_LAST} checkpoint average", averages)}
    out: list[Measurement] = []
    by_tokens: dict[float, dict[str, Any]] = {}
    for key, (name, frame) in methods.items():
        pairs, unaveraged = {}, {}
        for tokens in sorted(set(sqrt["D"])):
            a = frame[frame["D"] == tokens].groupby("parent")["loss"].last()
            b = sqrt[sqrt["D"] == tokens].set_index("parent")["loss"]
            shared = sorted(set(a.index) & set(b.index))
            if shared:
                pairs[tokens] = ([float(a[p]) for p in shared], [float(b[p]) for p in shared])
                unaveraged[tokens] = raw[raw["D"] == tokens]["loss"].mean()
        noise = paired_noise(pairs.values())
        for tokens, (a, b) in pairs.items():
            gap = measured(f"{name} of the long run vs its 1-sqrt branch at D={tokens:.3g}",
                           relative_gap(a, b, noise, paired=True))
            out.append(gap)
            drop = unaveraged[tokens] - np.mean(b)
            row = by_tokens.setdefault(tokens, {"tokens": int(tokens), "long_run_loss": float(unaveraged[tokens]),
                                                "branch_loss": float(np.mean(b))})
            row.update({f"{key}_loss": float(np.mean(a)), f"{key}_gap": gap.value, f"{key}_gap_low": gap.low,
                        f"{key}_gap_high": gap.high,
                        f"{key}_recovered": float((unaveraged[tokens] - np.mean(a)) / drop) if drop > 0 else None})
    return out, [by_tokens[t] for t in sorted(by_tokens)]


def _plot(ctx: Context, arms, branches, averages) -> str:
    with figure(ctx.out / "wsd.png", "training tokens D") as ax:
        ax.plot(arms["tokens"], arms["cosine_loss"], "o-", label="cosine (tuned LR)")
        ax.plot(arms["tokens"], arms["wsd_loss"], "s-", label="WSD 1-sqrt 20% (tuned LR)")
        if len(branches):
            ax.plot(branches["tokens"], branches["branch_loss"], "x--", label="cooldown branches")
        if len(averages) and "ema_loss" in averages:
            ax.plot(averages["tokens"], averages["ema_loss"], "^:", label="long run's weight EMA (no cooldown)")
        if len(averages) and "average_loss" in averages:
            ax.plot(averages["tokens"], averages["average_loss"], "v:",
                    label=f"long run's last-{AVERAGE_LAST} checkpoint average (no cooldown)")
    return "wsd.png"


def below_zero(m: Measurement) -> str:
    """1-sqrt beats linear: agree when the whole interval of the gap is below 0, disagree when above."""
    if not decidable(m):
        return "inconclusive"
    return "agree" if m.high < 0 else "disagree" if m.low > 0 else "inconclusive"


def verdict(analysis: Analysis) -> tuple[str, str]:
    from testbed.study.base import at_most, combine

    checks = [(m, at_most(m, TOLERANCE)) for m in [analysis.headline] + analysis.more if "cosine" in m.name]
    checks += [(m, below_zero(m)) for m in analysis.more if m.name.startswith("1-sqrt")]
    # Name what fails and in which direction: a branch may fail by being better, not only worse.
    failing = "; ".join(f"{m.name}: {m.value:+.1%} [{m.low:+.1%}, {m.high:+.1%}]"
                        for m, part in checks if part == "disagree")
    return combine([part for _, part in checks],
                   disagree=f"outside the tolerance (WSD at most +{TOLERANCE:.0%} over cosine, 1-sqrt below linear), "
                            f"interval included: {failing}",
                   agree="every duration's interval lies within the tolerance and 1-sqrt is below linear",
                   inconclusive="some interval straddles the tolerance or is missing (a single seed gives none)")


register(Study(
    name="wsd", version=5,
    changes="beside the weight EMA, the long run's last-4 checkpoint average at each branch's end (its checkpoints "
            "spread over the branch's last 20%; evaluation only, no training). v4: the rule dropped "
            "branches-match-separate-runs (an identity with warmup in steps, 0 [0, 0]) and bracketed each duration's "
            "LR; claim and rule as in v4.",
    brackets=brackets,
    paper="Hägele et al. 2024, Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations",
    claim="A constant LR with a 1-sqrt cooldown over the last 20% (WSD) matches cosine at every training "
          "duration, each at its own tuned LR (so cooldown branches of one long WSD run trace the cosine "
          "frontier); a 1-sqrt cooldown beats a linear one.",
    sweeps=sweeps, analyse=analyse, verdict=verdict, extra=extra, extra_cost=extra_cost, sizes=SIZES,
    caveat="The LR grid is coarse (a factor 2; the optimum may fall between points), a 37k-parameter "
           "model trains at most 36 tokens per non-embedding parameter, short runs give the cooldown few steps "
           "(32 at the shortest), and two seeds make a crude interval.",
))
