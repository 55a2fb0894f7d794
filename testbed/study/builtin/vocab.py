"""Larger models deserve larger vocabularies (Tao et al. 2024): IsoFLOP profiles over the vocabulary.

For each model size (non-vocabulary parameters N_nv) at its own compute budget, the same text is
tokenised at five vocabulary sizes from one nested BPE ladder (`data prepare --nested-in`) and
the runs are compared in bits per byte, the unit that does not depend on the tokenizer. The
vocabulary with the lowest bits per byte, from a parabola in log V, is V_opt for that size. Each
size's budget trains it on TOKENS_PER_PARAMETER tokens per non-vocabulary parameter at the
ladder's middle vocabulary, so the data grows with the model as at compute-optimal scale.

Two stages. `vocab-lr` tunes each size's LR at the middle vocabulary (three LRs a factor LR_RATIO
apart around a centre falling as 1/d_model, bracketed: extended past an edge where the best lands
there); `extra` then trains every vocabulary's profile (`vocab-V`) at that size's chosen LR, with
another seed (its own initialisation and data order), so the middle vocabulary's point is not the
minimum over the LRs that chose it (which would pull every V_opt towards it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from testbed.stats.curves import parametric_bootstrap, percentile
from testbed.study.base import Analysis, Bracket, Context, Measurement, Study, above, choose, figure, register
from testbed.study.recipes import BATCH, VOCAB_LADDER, base, ladder_corpus, tiny_text

# Tao et al.'s Approach 2 on their runs: N_v,opt ∝ N_nv^0.8354 (sail-sg/scaling-with-vocab).
PUBLISHED_GAMMA = 0.8354
# (d_model, n_layers). cpu: four widths in 2 layers (N_nv 14k-107k, a factor 7.7); at 20 tokens
# per parameter v2's d_model 128 in 4 layers (804k) alone would take an hour; gpu tops out at
# d_model 768 (57M) for the same reason (v2: 1024).
MODELS = {"tiny": [(16, 2), (32, 2)], "cpu": [(24, 2), (32, 2), (48, 2), (64, 2)],
          "gpu": [(256, 8), (512, 8), (768, 8)]}
# Tokens per non-vocabulary parameter at the reference vocabulary, the same for every size: v2's
# budgets gave every cpu size about 1M tokens (16 per parameter at d_model 32, 1.2 at 128), where a
# flat optimum is expected; Tao et al.'s optimum grows with compute-optimal D (Chinchilla's ~20).
# tiny: mechanics only.
# cpu: 18 (v3: 20), so the profiles' own seed (four more runs than v3) fits the 30 minutes.
TOKENS_PER_PARAMETER = {"tiny": 0.5, "cpu": 18, "gpu": 20}
# The LR falls as 1/d_model from LR_CENTRE at LR_WIDTH (chinchilla's cpu and gpu rule) and is tuned
# at the reference vocabulary only: a full grid at every vocabulary would triple the runs.
LR_CENTRE = {"tiny": 1e-2, "cpu": 6e-3, "gpu": 2e-3}
LR_WIDTH = {"tiny": 16, "cpu": 32, "gpu": 512}
LR_RATIO = 2.5


def reference(size: str) -> int:
    """The vocabulary the budgets and the LR check are set at: the ladder's middle."""
    ladder = VOCAB_LADDER[size]
    return ladder[len(ladder) // 2]


def budgets(size: str, tree: dict[str, Any]) -> list[float]:
    """Each model's training FLOPs: TOKENS_PER_PARAMETER x N_nv tokens at the reference vocabulary
    (the other vocabularies get the same FLOPs, so fewer tokens with a larger head)."""
    from testbed.config import ModelConfig
    from testbed.model.counting import count_params, flops_per_token

    out = []
    for d, layers in MODELS[size]:
        cfg = ModelConfig(**{**tree["model"], "d_model": d, "n_layers": layers, "n_heads": max(1, d // 32),
                             "vocab_size": reference(size)})
        n_nv = count_params(cfg).non_embedding
        out.append(float(TOKENS_PER_PARAMETER[size] * n_nv * flops_per_token(cfg, tree["data"]["seq_len"])))
    return out


def _models(size: str) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The shared base (real text at every size) and the zip of models and their budgets."""
    tree = tiny_text(base(size)) if size == "tiny" else base(size)
    models = MODELS[size]
    return tree, {"model.d_model": [d for d, _ in models], "model.n_layers": [n for _, n in models],
                  "labels.budget": budgets(size, tree)}


def _sweep(size: str, name: str, vocab: int, tree: dict[str, Any], zipped: dict[str, list[Any]],
           grid: dict[str, list[Any]]) -> dict[str, Any]:
    batch = BATCH[size]
    tree = {**tree, "data": {**tree["data"], "path": ladder_corpus(size, vocab)},
            "model": {**tree["model"], "vocab_size": vocab}}
    return {"name": name, "base": tree, "zip": zipped, "grid": grid,
            "derived": {"model.n_heads": "max(1, d_model // 32)",
                        "train.tokens": f"max(4, round(labels.budget / flops_per_token / {batch})) * {batch}",
                        # rounded: the grid prints as 0.0048, not 0.0048000000000000004
                        "optim.lr": f"round({LR_CENTRE[size]} * {LR_WIDTH[size]} / d_model"
                                    f" * {LR_RATIO} ** labels.lr_step, 8)"},
            "labels": ["labels.budget", "model.d_model", "labels.lr_step"]}


def sweeps(size: str) -> list[dict[str, Any]]:
    """`vocab-lr`: each size at the reference vocabulary on three LRs (tiny: the centre alone),
    seed 0. Its corpus and vocab_size are stated together, so `study plan` can cost the runs before
    the corpora are prepared. One seed per stage: the interval comes from the parabolas' residuals."""
    tree, zipped = _models(size)
    return [_sweep(size, "vocab-lr", reference(size), tree, zipped,
                   {"labels.lr_step": [0] if size == "tiny" else [-1, 0, 1]})]


PROFILE_SEED = 1  # the profiles' seed, not the LR check's: the check's choice does not measure them


def profile_sweeps(size: str, steps: dict[int, int]) -> list[dict[str, Any]]:
    """One sweep per vocabulary (`vocab-V`): every size at its chosen LR step (by d_model), seed 1
    for the initialisation and the data order."""
    tree, zipped = _models(size)
    tree = {**tree, "train": {**tree["train"], "seed": PROFILE_SEED}, "data": {**tree["data"], "seed": PROFILE_SEED}}
    zipped = {**zipped, "labels.lr_step": [steps[d] for d in zipped["model.d_model"]]}
    return [_sweep(size, f"vocab-{vocab}", vocab, tree, zipped, {}) for vocab in VOCAB_LADDER[size]]


def brackets(size: str) -> dict[str, Bracket]:
    return {} if size == "tiny" else {"vocab-lr": Bracket({"labels.lr_step": "linear"})}


def lr_check(finals):
    """Each size's LR choice at the reference vocabulary (by its lr step), from `vocab-lr`'s finals."""
    return choose(finals, ["N_non_embedding"], lr="label_lr_step")


def extra(ctx: Context, options: dict[str, Any]) -> None:
    """Train every vocabulary's profile at the LR step `vocab-lr` chose for each size (their corpora
    are prepared before any run, from extra_cost)."""
    from testbed.study.sweeps import run_sweep

    finals = ctx.finals("vocab-lr")
    check = lr_check(finals)
    width = finals.groupby("N_non_embedding")["width"].first()
    steps = {int(width[n]): int(step) for n, step in zip(check.cells["N_non_embedding"], check.cells["lr"])}
    for spec in profile_sweeps(ctx.size, steps):
        ctx.sweep_dirs[spec["name"]] = run_sweep(ctx.out, spec, workers=options["workers"], servers=options["servers"])


def extra_cost(size: str) -> list[dict[str, Any]]:
    """What `extra` trains, for `study plan`: the profiles at the centre LR (the step costs nothing)."""
    return profile_sweeps(size, {d: 0 for d, _ in MODELS[size]})


def v_opt(vocab, bpb) -> tuple[float | None, bool]:
    """(V at the minimum of a parabola in log V through the points, whether it is inside the
    sampled range); the lowest sampled V when the parabola opens downward."""
    x, y = np.log(np.asarray(vocab, float)), np.asarray(bpb, float)
    if len(set(x)) < 3:
        return None, False
    a, b, _ = np.polyfit(x, y, 2)
    if a <= 0:
        best = float(np.exp(x[np.argmin(y)]))
        return best, False
    at = -b / (2 * a)
    inside = bool(x.min() <= at <= x.max())
    return float(np.exp(np.clip(at, x.min(), x.max()))), inside


def _slope(frame) -> tuple[float | None, float | None, list[dict[str, Any]]]:
    """(b in V_opt ∝ N_nv^b, γ in V_opt·d ∝ N_nv^γ, the per-size optima)."""
    rows: list[dict[str, Any]] = []
    for n_nv, g in frame.groupby("N_non_embedding"):
        best, inside = v_opt(g["vocab"], g["bpb"])
        if best is None:
            return None, None, rows
        d = float(g["width"].iloc[0])
        rows.append({"N_nv": float(n_nv), "d_model": int(d), "V_opt": best, "inside": inside,
                     "N_v_opt": best * d})
    if len(rows) < 2:
        return None, None, rows
    n = np.log([r["N_nv"] for r in rows])
    slope = float(np.polyfit(n, np.log([r["V_opt"] for r in rows]), 1)[0])
    gamma = float(np.polyfit(n, np.log([r["N_v_opt"] for r in rows]), 1)[0])
    return slope, gamma, rows


def analyse(ctx: Context) -> Analysis:
    import pandas as pd

    check = lr_check(ctx.finals("vocab-lr"))
    profiles = pd.concat([ctx.finals(f"vocab-{v}") for v in VOCAB_LADDER[ctx.size]], ignore_index=True)
    frame = profiles[["run_id", "N_non_embedding", "width", "vocab", "bpb", "C", "D", "peak_lr"]].dropna()
    frame = frame.sort_values(["N_non_embedding", "vocab"]).reset_index(drop=True)
    slope, gamma, rows = _slope(frame)
    low = high = (None, None)
    how = "parabola in log V per model size; no interval (a parabola failed or too few sizes)"
    caveats = []
    if slope is not None and gamma is not None:
        (low, high), how, caveat = _interval(frame, rows)
        caveats += [caveat] if caveat else []
    if any(not r["inside"] for r in rows):
        caveats.insert(0, "some V_opt lies at the edge of the sampled vocabularies")
    caveats += check.edges()
    caveat = "; ".join(caveats)
    headline = Measurement("b in V_opt ∝ N_nv^b", slope, low[0], high[0], "", how, caveat)
    more = []
    if gamma is not None:
        more.append(Measurement(f"γ in N_v,opt = V_opt·d ∝ N_nv^γ (paper: {PUBLISHED_GAMMA})", gamma,
                                low[1], high[1], "", how + "; the paper's γ < 1: vocabulary parameters "
                                "grow slower than non-vocabulary ones", caveat))
    points = [{"N_nv": float(r["N_non_embedding"]), "vocab": int(r["vocab"]), "bpb": float(r["bpb"]),
               "C": float(r["C"]), "tokens_per_N_nv": float(r["D"] / r["N_non_embedding"]),
               "lr": float(r["peak_lr"])} for _, r in frame.iterrows()]
    chosen = frame.groupby("N_non_embedding")["peak_lr"].first()
    lrs = [{"N_nv": float(c["N_non_embedding"]), "lr step": int(c["lr"]), "lr": float(chosen.get(c["N_non_embedding"], np.nan)),
            "steps tried": str([int(g) for g in c["grid"]]), "edge": c["edge"] or "inside"}
           for _, c in check.cells.iterrows()]
    notes = ["agree: the interval of b lies above 0 (V_opt grows with the model); disagree: below 0",
             f"budgets: {TOKENS_PER_PARAMETER[ctx.size]:g} tokens per non-vocabulary parameter at V = "
             f"{reference(ctx.size)}, the same FLOPs at every vocabulary",
             f"learning rates: each size's chosen at V = {reference(ctx.size)} (steps of a factor {LR_RATIO} from a "
             f"centre falling as 1/d_model, bracketed; {check.method}); every vocabulary's profile then trained "
             f"at it with seed {PROFILE_SEED}"]
    if more and more[0].low is not None and more[0].high is not None:
        holds = more[0].low <= PUBLISHED_GAMMA <= more[0].high
        notes.append(f"the paper's trend, N_v,opt ∝ N_nv^{PUBLISHED_GAMMA} (Approach 2 on its 1,200 runs), "
                     f"{'lies inside' if holds else 'lies outside'} the interval of γ")
    return Analysis(headline, more, {"optimal vocabulary": rows, "points": points, "learning rates": lrs},
                    [_plot(ctx, points)], notes)


def _interval(frame, rows: list[dict], draws: int = 400) -> tuple[tuple[tuple, tuple], str, str]:
    """Intervals of (b, γ) by a parametric bootstrap of the parabolas' residuals: the sizes and
    vocabularies stay as they were run; every replicate counts, one whose optimum leaves the
    sampled vocabularies included (counted, and a caveat when it could move an interval's end)."""
    sizes = frame["N_non_embedding"].to_numpy(float)
    log_v, bpb = np.log(frame["vocab"].to_numpy(float)), frame["bpb"].to_numpy(float)
    fitted = np.empty_like(bpb)
    for n_nv in np.unique(sizes):
        at = sizes == n_nv
        fitted[at] = np.polyval(np.polyfit(log_v[at], bpb[at], 2), log_v[at])
    df = len(bpb) - 3 * len(np.unique(sizes))
    if df < 1:
        return ((None, None), (None, None)), "three vocabularies per size: no residual to resample", ""
    sd = float(np.sqrt(np.sum((bpb - fitted) ** 2) / df))
    outside = 0

    def refit(y):
        nonlocal outside
        value, value_gamma, again = _slope(frame.assign(bpb=y))
        if value is None or any(not r["inside"] for r in again):
            outside += 1
        return None if value is None else (value, value_gamma)

    replicates = parametric_bootstrap(refit, fitted, sd, df, draws)
    values = np.array([r if r is not None else (np.nan, np.nan) for r in replicates], float)
    (b_low, b_high), (g_low, g_high) = percentile(values[:, 0]), percentile(values[:, 1])
    share = outside / draws
    how = (f"parabola in log V per model size; parametric bootstrap of the residuals ({draws} replicates, "
           f"{share:.0%} with an optimum at the edge of the sampled vocabularies)")
    caveat = f"the optimum leaves the sampled vocabularies in {share:.0%} of replicates" if share > 0.025 else ""
    return ((b_low, g_low), (b_high, g_high)), how, caveat


def _plot(ctx: Context, points: list[dict]) -> str:
    with figure(ctx.out / "vocab.png", "vocabulary size V", "validation bits per byte", log_base=2) as ax:
        for n_nv in sorted({p["N_nv"] for p in points}):
            pts = [p for p in points if p["N_nv"] == n_nv]
            ax.plot([p["vocab"] for p in pts], [p["bpb"] for p in pts], "o-", label=f"N_nv = {n_nv:.3g}")
    return "vocab.png"


def verdict(analysis: Analysis) -> tuple[str, str]:
    return above(analysis.headline, 0,
                 agree="V_opt grows with N_nv across the whole interval",
                 disagree="V_opt shrinks with N_nv across the whole interval",
                 holds="the interval of b holds 0",
                 undecided="no interval for b (too few sizes or vocabularies), or a caveat on it")


register(Study(
    name="vocab", version=4,
    changes="the profiles train at each size's LR chosen at the middle vocabulary (v3: at the centre, which the "
            "check's top LR beat for 2 of 4 sizes), the check bracketed (extended past an edge), "
            "the profiles on a seed of their own; cpu budgets at 18 tokens per non-vocabulary parameter (v3: 20) "
            "to fit; claim and rule unchanged.",
    brackets=brackets, extra=extra, extra_cost=extra_cost,
    paper="Tao et al. 2024, Scaling Laws with Vocabulary: Larger Models Deserve Larger Vocabularies",
    claim="At a compute budget matched to the model, the vocabulary giving the lowest loss per byte "
          "grows with the model's non-vocabulary parameters (V_opt ∝ N_nv^b with b > 0), with "
          "vocabulary parameters growing more slowly than non-vocabulary ones.",
    sweeps=sweeps, analyse=analyse, verdict=verdict,
    caveat="Small models over less than a decade of N_nv (cpu: 14k-107k), one seed per point, the LR tuned "
           "at one vocabulary only (its optimum may move with V), code rather than prose (whose token "
           "statistics differ), and embeddings that dominate the parameters of the smallest models.",
))
