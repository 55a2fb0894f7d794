"""Learning-rate sensitivity with and without QK-norm and z-loss (Wortsman et al. 2023).

Each arm (plain, QK-norm, z-loss; both together at gpu size) trains at two depths over a wide
log-spaced LR grid, so that the plain arm's top LRs go unstable, with seeds that vary the data
order too. The runs are
short and keep the repo's gradient clipping (optim.grad_clip 1.0, the paper's). The divergence
guard is off in this study (train.divergence_nats null): a run at too high an LR finishes with
a bad loss instead of stopping as failed, and `lr_sensitivity` counts any loss above the
initial one as the initial one, as the paper does for a diverged run.

After training, without more training, each run's final checkpoint is read on a fixed
validation batch for the largest attention logit (q.k times the attention's scale, over every
head, layer and causal position) and the output logits (their mean logsumexp z, what the
z-loss penalises, and their largest value). L_init is the validation loss of a freshly
initialised model of the same arm, depth and seed.

The report gives each arm's LR sensitivity per depth, the differences plain − QK-norm and
plain − z-loss (paired by seed; t intervals on the seed noise pooled over the study's cells)
and the attention- and output-logit growth against LR.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from testbed.stats import Estimate, mean_interval, seed_noise
from testbed.study.base import (
    Analysis,
    Context,
    Measurement,
    Study,
    combine,
    decidable,
    figure,
    lr_sensitivity,
    measured,
    register,
)
from testbed.study.recipes import BATCH, seeds, small_vocab_base

# name -> (model.qk_norm, optim.z_loss); PaLM's and the paper's z-loss weight 1e-4
ARMS = {"plain": (False, 0.0), "qk_norm": (True, 0.0), "z_loss": (False, 1e-4), "qk_norm+z_loss": (True, 1e-4)}
GROWTH = 2.0  # "much above": plain's largest attention logit at the top LR at least twice the bottom LR's
MEASURE_SEQUENCES = 16  # the fixed validation batch the logits are read on

# Per size: arms, width and heads (fixed), depths, the LR grid (log-spaced, ~3x apart), training steps.
DESIGN: dict[str, dict[str, Any]] = {
    # tiny: the top LR (1.0) is far past stable, to exercise a run that blows up
    "tiny": {"arms": ["plain", "qk_norm", "z_loss"], "d_model": 16, "heads": 2, "depths": [1, 2],
             "lrs": [1e-2, 1.0], "steps": 20},
    "cpu": {"arms": ["plain", "qk_norm", "z_loss"], "d_model": 64, "heads": 2, "depths": [2, 6],
            "lrs": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1], "steps": 150},
    "gpu": {"arms": list(ARMS), "d_model": 256, "heads": 4, "depths": [4, 12],
            "lrs": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1], "steps": 5000},
}


def sweeps(size: str) -> list[dict[str, Any]]:
    design = DESIGN[size]
    tree = small_vocab_base(size, text_at_tiny=True)
    tree["model"]["d_model"] = design["d_model"]
    tree["model"]["n_heads"] = design["heads"]
    # A run at too high an LR must end with its bad loss, not fail (a failed run stops the study).
    tree["train"]["divergence_nats"] = None
    tree["train"]["tokens"] = design["steps"] * BATCH[size]
    arms = design["arms"]
    return [{"name": "stability", "base": tree,
             "zip": {"labels.arm": arms, "model.qk_norm": [ARMS[a][0] for a in arms],
                     "optim.z_loss": [ARMS[a][1] for a in arms]},
             "grid": {"model.n_layers": design["depths"], "optim.lr": design["lrs"], "train.seed": seeds(size)},
             "labels": ["labels.arm", "model.n_layers", "optim.lr", "train.seed"]}]


# ---------------------------------------------------------------------------- the measures


def logit_stats(model, windows) -> dict[str, float]:
    """On token windows [B, T+1]: the largest attention logit over every layer (forward hooks on
    the attention sublayers), the mean and largest output logsumexp z, the largest output logit
    and the loss."""
    import torch
    import torch.nn.functional as F

    from testbed.model.transformer import CausalSelfAttention

    largest: list[float] = []

    def hook(module, inputs, output):
        largest.append(float(module.logits(inputs[0]).max()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, CausalSelfAttention)]
    model.eval()
    try:
        with torch.no_grad():
            logits = model(windows[:, :-1]).float()
    finally:
        for handle in handles:
            handle.remove()
    z = torch.logsumexp(logits, dim=-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return {"max_attn_logit": max(largest) if largest else math.nan, "mean_z": float(z.mean()),
            "max_z": float(z.max()), "max_output_logit": float(logits.max()), "batch_loss": float(loss)}


def measure_run(run_dir: str, inits: dict[tuple, float]) -> dict[str, float]:
    """logit_stats of a run's final checkpoint on its first MEASURE_SEQUENCES validation windows,
    and L_init: the validation loss of a fresh model of the same architecture and seed (kept in
    `inits` by that key, since the LR and the z-loss weight do not change it)."""
    import torch

    from testbed.data import loader as data_loader
    from testbed.model.transformer import Transformer
    from testbed.train.distributed import Dist
    from testbed.train.load import load
    from testbed.train.trainer import evaluate

    loaded = load(run_dir)
    config = loaded.config
    source = data_loader.make_source(config)
    val_ids = data_loader.validation_windows(source, config.data.val_sequences)
    windows = torch.from_numpy(source.windows(val_ids[:MEASURE_SEQUENCES], data_loader.VALIDATION)).long()
    stats = logit_stats(loaded.model, windows)
    key = (loaded.model.cfg.qk_norm, loaded.model.cfg.n_layers, config.train.seed)
    if key not in inits:
        torch.manual_seed(config.train.seed)
        fresh = Transformer(loaded.model.cfg)
        inits[key] = evaluate(fresh, source, val_ids, len(val_ids), loaded.device, loaded.dtype, Dist(),
                              None)["val_loss"]
    return {**stats, "L_init": inits[key]}


# ---------------------------------------------------------------------------- analysis


def analyse(ctx: Context) -> Analysis:
    finals = ctx.finals("stability").copy()
    inits: dict[tuple, float] = {}
    stats = [measure_run(d, inits) for d in finals["run_dir"]]
    for column in stats[0]:
        finals[column] = [s[column] for s in stats]
    return summarise(finals, ctx.out)


def summarise(finals, out: Path) -> Analysis:
    """The analysis of the final points once each carries its measures (measure_run's columns)."""
    arms = [a for a in ARMS if a in set(finals["label_arm"])]
    depths = sorted(int(d) for d in set(finals["depth"]))
    deepest = depths[-1]

    # One LR sensitivity per (arm, depth, seed): over that seed's LR grid, against its own L_init.
    per_seed: dict[tuple[str, int], dict[Any, float]] = {}
    for (arm, depth, seed), g in finals.groupby(["label_arm", "depth", "label_seed"]):
        per_seed.setdefault((arm, int(depth)), {})[seed] = lr_sensitivity(g["loss"], float(g["L_init"].mean()))
    # Seed noise is a property of the recipe, pooled over every cell (testbed.stats.intervals).
    noise = seed_noise([list(v.values()) for v in per_seed.values()], log=False)
    comparisons = [a for a in ("qk_norm", "z_loss", "qk_norm+z_loss") if a in arms]
    differences: dict[tuple[str, int], list[float]] = {
        (a, depth): _paired(per_seed[("plain", depth)], per_seed[(a, depth)]) for a in comparisons for depth in depths}
    paired = seed_noise(differences.values(), log=False)

    def gap(a: str, depth: int) -> Measurement:
        return measured(f"LR sensitivity plain − {a} at {depth} layers",
                        mean_interval(differences[(a, depth)], paired), "nats")

    headline = gap("qk_norm", deepest)
    more = [gap(a, depth) for a in comparisons for depth in depths if (a, depth) != ("qk_norm", deepest)]
    more += [_growth(finals, arm, deepest) for arm in arms]
    more += [measured(f"LR sensitivity of {arm} at {depth} layers",
                      mean_interval(list(per_seed[(arm, depth)].values()), noise), "nats")
             for arm in arms for depth in depths]
    l_init = finals.groupby(["label_arm", "depth"])["L_init"].mean()
    sensitivity_rows = [{"arm": arm, "n_layers": depth,
                         "lr_sensitivity": float(np.mean(list(per_seed[(arm, depth)].values()))),
                         "seeds": len(per_seed[(arm, depth)]), "L_init": float(l_init[(arm, depth)])}
                        for arm in arms for depth in depths]
    columns = ["loss", "max_attn_logit", "mean_z", "max_output_logit"]
    logit_rows = [{"arm": arm, "n_layers": int(depth), "lr": float(lr), **{c: float(g[c].mean()) for c in columns}}
                  for (arm, depth, lr), g in finals.groupby(["label_arm", "depth", "peak_lr"])]
    notes = [f"agree: the sensitivity difference plain − qk_norm at {deepest} layers has an interval above 0 and "
             f"plain's largest attention logit at the top LR is more than {GROWTH:g}x the bottom LR's "
             "(its interval above); "
             "disagree: that difference's interval lies below 0; inconclusive otherwise",
             "LR sensitivity (Wortsman et al. 2023): the mean over the LR grid of min(L(η), L_init) − L*, per seed; "
             "L_init: a freshly initialised model's validation loss",
             f"logits read on {MEASURE_SEQUENCES} validation windows from each run's final checkpoint; "
             "gradient clipping at the repo's default global norm 1.0; divergence guard off"]
    if noise is not None:
        notes.append(f"sensitivity noise: {noise.describe()}")
    return Analysis(headline, more, {"sensitivity": sensitivity_rows, "logits": logit_rows},
                    [_plot(out, logit_rows, depths)], notes)


def _paired(a: dict[Any, float], b: dict[Any, float]) -> list[float]:
    """a − b for every seed present in both."""
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def _growth(finals, arm: str, depth: int) -> Measurement:
    """The largest attention logit at the top LR over the bottom LR's, per seed, as a geometric
    mean with a t interval on the log ratios (seed noise pooled over every arm and depth)."""
    ratios: dict[tuple[str, int], list[float]] = {}
    for (a, d), g in finals.groupby(["label_arm", "depth"]):
        by_seed = g.pivot_table(index="label_seed", columns="peak_lr", values="max_attn_logit")
        low, high = by_seed.columns.min(), by_seed.columns.max()
        ratios[(a, int(d))] = list(np.log(by_seed[high] / by_seed[low]).dropna())
    noise = seed_noise(ratios.values(), log=False)
    estimate = mean_interval(ratios[(arm, depth)], noise)
    value = estimate.value
    name = f"attention-logit growth of {arm} at {depth} layers (top LR / bottom LR)"
    if value is None or not np.isfinite(value):
        return Measurement(name, None, how="no finite ratio")
    exp = Estimate(math.exp(value), None if estimate.low is None else math.exp(estimate.low),
                   None if estimate.high is None else math.exp(estimate.high), estimate.method + " on log ratios")
    return measured(name, exp, "x")


def _plot(out: Path, rows: list[dict], depths: list[int]) -> str:
    styles = {depth: style for depth, style in zip(depths, ["--", "-", ":"][-len(depths):])}
    with figure(out / "stability.png", "peak learning rate", "largest attention logit") as ax:
        for colour, arm in enumerate(ARMS):  # one colour per arm, one line style per depth
            for depth in depths:
                line = sorted((r["lr"], r["max_attn_logit"]) for r in rows
                              if r["arm"] == arm and r["n_layers"] == depth)
                if line:
                    ax.plot(*zip(*line), styles[depth], color=f"C{colour}", marker="o", label=f"{arm}, {depth} layers")
        ax.set_yscale("log")
    return "stability.png"


def verdict(analysis: Analysis) -> tuple[str, str]:
    difference = analysis.headline
    growth = next(m for m in analysis.more if m.name.startswith("attention-logit growth of plain"))
    wider = ("inconclusive" if not decidable(difference) else "agree" if difference.low > 0
             else "disagree" if difference.high < 0 else "inconclusive")
    grows = "agree" if decidable(growth) and growth.low > GROWTH else "inconclusive"
    return combine([wider, grows],
                   disagree="QK-norm makes the deeper model more sensitive to the LR (interval below 0)",
                   agree=f"plain's attention logits grow over {GROWTH:g}x with LR and QK-norm lowers its LR "
                         "sensitivity across the whole interval",
                   inconclusive="the sensitivity difference's interval holds 0, or plain's attention-logit growth is "
                                f"not clearly over {GROWTH:g}x")


register(Study(
    name="stability", version=1,
    paper="Wortsman et al. 2023, Small-scale proxies for large-scale Transformer training instabilities",
    claim="In small models, instabilities seen at scale appear at high learning rates: attention logits grow "
          "(and attention entropy collapses) and output logits diverge; QK-norm and z-loss (1e-4) each widen the "
          "band of LRs that train well, lowering the LR sensitivity (mean over log-spaced LRs of "
          "min(L, L_init) − L*).",
    sweeps=sweeps, analyse=analyse, verdict=verdict,
    caveat="The paper's models train for 10^4-10^5 steps with long warmup; these runs are a few hundred steps "
           "with 5% warmup, so instabilities that build up slowly may not show, and short-run losses at low LRs "
           "are far from converged (which raises every arm's sensitivity alike). AdamW's epsilon, weight decay and "
           "the 1.0 gradient clip are the repo's defaults, which the paper shows also shift the stable band.",
))
