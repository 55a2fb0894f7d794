"""Data mixing laws (Ye et al. 2024): a few mixtures predict the losses of unseen ones.

One model at one token count trains on mixtures of three domains of the Python standard library
(its code, its test suite, and the docstrings of both as prose; testbed/study/corpus.py, one BPE
for all three): the ten mixtures of a simplex grid in thirds, corners included, and three
held-out mixtures inside it, each with seeds that vary the data order. The exponential law
L_i(r) = c_i + k_i exp(sum_j t_ij r_j) is fitted per domain on the grid's runs (testbed fit
--law mixing's own code) and predicts each domain's loss on the held-out mixtures; a RegMix-style
ridge regression on the same runs is reported beside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from testbed.study.base import Analysis, Context, Measurement, Study, combine, figure, register, within
from testbed.study.recipes import BATCH, SEQ, base, seeds

TOLERANCE = 0.01  # each held-out prediction within 1% of the loss measured there
DOMAINS = ("library", "tests", "docstrings")
VOCAB = 512
THIRDS = [(a, b, 3 - a - b) for a in range(4) for b in range(4 - a)]  # the ten grid points, in thirds
HELD_OUT = [(0.6, 0.2, 0.2), (0.2, 0.6, 0.2), (0.2, 0.2, 0.6)]


def mixtures() -> list[tuple[tuple[float, ...], bool]]:
    """(weights in DOMAINS order, held out) of every mixture the study trains."""
    grid = [tuple(k / 3 for k in point) for point in THIRDS]
    return [(w, False) for w in grid] + [(w, True) for w in HELD_OUT]


def _name(weights: tuple[float, ...]) -> str:
    return "-".join(f"{d[:3]}{w:.2f}" for d, w in zip(DOMAINS, weights))


def sweeps(size: str) -> list[dict[str, Any]]:
    from testbed.study.corpus import domain_path

    mini = size == "tiny"
    tree = base(size)
    seq = 32 if mini else SEQ[size]
    tree["data"] = {"source": "mixture", "seq_len": seq, "val_sequences": 64 if mini else 128,
                    "source_options": {"sources": {d: str(domain_path(d, VOCAB, mini)) for d in DOMAINS}}}
    # One model, one token count: d48 x 4 at AdamW's LR of the optimizers study at that width.
    tree["model"].update({"d_model": 16 if mini else 48, "n_layers": 2 if mini else 4, "n_heads": 2 if mini else 3,
                          "max_seq_len": seq, "vocab_size": VOCAB})
    tree["optim"]["lr"] = 1e-2 if mini else 4e-3
    tree["train"]["tokens"] = (64 if mini else 500) * BATCH[size]
    planned = mixtures()
    return [{"name": "mixture", "base": tree,
             "zip": {"data.source_options.weights": [{d: w for d, w in zip(DOMAINS, ws)} for ws, _ in planned],
                     "labels.mixture": [_name(ws) for ws, _ in planned],
                     "labels.heldout": [int(held) for _, held in planned]},
             "grid": {"train.seed": seeds(size)},
             "labels": ["labels.mixture", "labels.heldout", "train.seed"]}]


def analyse(ctx: Context) -> Analysis:
    from testbed.fit.laws.mixing import Mixtures, SourceFit, fit_mixing

    finals = ctx.finals("mixture")
    components = [c[len("weight/"):] for c in finals.columns if str(c).startswith("weight/")]
    targets = [f"source/{d}/val_loss" for d in components]
    held = finals["label_heldout"].astype(int).to_numpy() == 1
    grid = Mixtures(finals.loc[~held].reset_index(drop=True), components, targets, "loss")
    fitted, regmix = fit_mixing(grid), fit_mixing(grid, "regmix")
    measurements, rows, regmix_errors = [], [], []
    for label, group in finals.loc[held].groupby("label_mixture", sort=True):
        weights = group[[f"weight/{c}" for c in components]].to_numpy(float)[0]
        for target in targets:
            one = fitted.fits[target]
            assert isinstance(one, SourceFit)
            observed = group[target].to_numpy(float)
            mean = float(np.exp(np.log(observed).mean()))
            # The law's value there (its covariance) against the geometric mean of the seeds' runs,
            # each with the fit's residual scatter: the log interval of law / measured.
            centre, low, high = one.interval(weights, new_run=True, runs=len(observed))
            domain = target.split("/")[1]
            measurements.append(Measurement(
                f"{domain} loss at held-out {label}: law / measured − 1", float(centre[0] / mean - 1),
                float(low[0] / mean - 1), float(high[0] / mean - 1),
                how=f"the law fitted on the grid's {int((~held).sum())} runs; t interval ({one.df} df) on the "
                    f"law's covariance and the scatter of a mean of {len(observed)} runs"))
            regmix_value = float(regmix.predict(weights)[target][0])
            regmix_errors.append(abs(regmix_value / mean - 1))
            rows.append({"mixture": label, "domain": domain, "measured": mean, "law": float(centre[0]),
                         "relative_error": float(centre[0] / mean - 1), "regmix": regmix_value, "seeds": len(observed)})
    worst = max(measurements, key=lambda m: abs(m.value or 0.0))
    mean_error = float(np.mean([abs(m.value or 0.0) for m in measurements]))
    more = [m for m in measurements if m is not worst]
    more.append(Measurement("mean |relative error| of the law over the held-out predictions", mean_error,
                            how="point estimate over the predictions above"))
    more.append(Measurement("mean |relative error| of RegMix (ridge on weights and their products)",
                            float(np.mean(regmix_errors)), how="point estimate; the regression gives no interval"))
    params = [{"domain": t.split("/")[1], **{k: float(v) for k, v in f.params.items()}}
              for t, f in fitted.fits.items()]
    notes = [f"agree: every held-out prediction's interval lies within ±{TOLERANCE:.0%}; disagree: one lies "
             f"wholly outside", f"components in order {', '.join(components)}; t of the last fixed at 0"]
    return Analysis(worst, more, {"held_out": rows, "law": params}, [_plot(ctx, rows)], notes)


def _plot(ctx: Context, rows: list[dict]) -> str:
    with figure(ctx.out / "mixture.png", "measured validation loss", ylabel="predicted validation loss") as ax:
        for domain, marker in zip(DOMAINS, "osD"):
            mine = [r for r in rows if r["domain"] == domain]
            ax.plot([r["measured"] for r in mine], [r["law"] for r in mine], marker, ls="", label=f"{domain}: law")
            ax.plot([r["measured"] for r in mine], [r["regmix"] for r in mine], marker, ls="", mfc="none",
                    label=f"{domain}: RegMix")
        values = [r[k] for r in rows for k in ("measured", "law", "regmix")]
        ax.plot([min(values), max(values)], [min(values), max(values)], "k:", lw=1)
    return "mixture.png"


def verdict(analysis: Analysis) -> tuple[str, str]:
    predictions = [analysis.headline] + [m for m in analysis.more if "held-out" in m.name]
    return combine([within(m, TOLERANCE) for m in predictions],
                   disagree=f"some held-out prediction is off by more than {TOLERANCE:.0%}, interval included",
                   agree=f"every held-out prediction is within {TOLERANCE:.0%}, interval included",
                   inconclusive=f"some prediction's interval straddles ±{TOLERANCE:.0%}")


register(Study(
    name="mixture", version=1,
    paper="Ye et al. 2024, Data Mixing Laws: Optimizing Data Mixtures by Predicting Language Modeling Performance",
    claim="Each domain's validation loss is an exponential function of the training mixture's proportions, "
          "L_i = c_i + k_i exp(sum_j t_ij r_j): fitted on a few mixtures it predicts unseen ones "
          f"(here: every held-out prediction within {TOLERANCE:.0%}).",
    sweeps=sweeps, analyse=analyse, verdict=verdict, sizes=("tiny", "cpu"),
    caveat="Three domains of one library share vocabulary and style far more than the paper's Pile domains; "
           "one small model at one token count; the held-out mixtures lie inside the fitted grid (interpolation); "
           "the docstrings are the smallest domain, so mixtures rich in it repeat it.",
))
