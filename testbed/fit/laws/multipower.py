"""The Multi-Power Law of Luo et al. 2025 ("A Multi-Power Law for Loss Curve Prediction Across
Learning Rate Schedules"): the whole loss curve under any learning-rate schedule.

    L(t) = L0 + A·(S1(t) + S_W)^(-alpha) - LD(t)
    LD(t) = B · sum_{k=1..t} (eta_(k-1) - eta_k) · G(eta_k^(-gamma) · S_k(t))
    G(x) = 1 - (C·x + 1)^(-beta),   S_k(t) = sum_{tau=k..t} eta_tau,   S1(t) = S_1(t)

Steps are counted from the end of warmup: eta_0 is the learning rate at the end of warmup (here:
the first step at the schedule's peak), S_W the sum of the warmup learning rates, and S1(t) the
sum of the learning rates after warmup. A point inside warmup has S1 = 0 there, the area so far in
place of S_W, and no loss drop. Each LR decrease (eta_(k-1) - eta_k) buys a loss drop that grows
with the learning-rate area run since it, saturating as a power law; a constant schedule has
LD = 0 and the law reduces to a power law in the LR area.

Rows are points of curves (run_id, step, lr, loss), as for the annealing law (annealing.py); the
learning rate between logged rows is interpolated linearly, over the run's whole logged schedule
(base.curve_runs) even where the fit keeps only some of its rows. A point's sum over k runs
over every step since warmup at which the LR changed; to keep the batched fit cheap these steps
are merged into at most `GROUPS` consecutive groups per point, each with its summed LR drop at
its drop-weighted middle step (a single sharp drop keeps its own step; on cosine, WSD and step
schedules the grouped sum is within 1e-4 of the exact one, which tests check).
"""

from __future__ import annotations

import numpy as np

from testbed.fit.laws.base import Law, Param, curve_runs, register

GROUPS = 48  # most LR-drop groups per point


def per_step_lr(steps, lrs, last: int) -> np.ndarray:
    """The learning rate of steps 1..last from logged (step, lr) pairs."""
    steps = np.asarray(steps, float)
    order = np.argsort(steps)
    return np.interp(np.arange(1, last + 1), steps[order], np.asarray(lrs, float)[order])


def _drop_terms(lr: np.ndarray, at_steps, groups: int | None):
    """For each step t in `at_steps`: the LR area so far (S1 + S_W), and its LR-drop terms
    (drop, eta_k, S_k(t)) as flat arrays with the number of terms per point. `groups=None`:
    every step its own term."""
    area = np.cumsum(lr)
    warmup_end = int(np.argmax(lr))  # 0-based index of the first step at the peak: eta_0
    drops = np.zeros_like(lr)
    drops[1:] = lr[:-1] - lr[1:]
    at = np.clip(np.asarray(at_steps, int), 1, len(lr)) - 1
    drop, eta, since, counts = [], [], [], []
    for t in at:
        ks = np.arange(warmup_end + 1, t + 1)  # post-warmup steps up to t (0-based)
        ks = ks[drops[ks] != 0]  # steps at a constant LR add nothing
        if groups is not None and ks.size > groups:
            # Each group of consecutive drops sits at its drop-weighted middle step, so a
            # single sharp drop (a step schedule) keeps its own step exactly.
            parts = np.array_split(ks, groups)
            d = np.array([drops[p].sum() for p in parts])
            mid = np.array([int(round(np.average(p, weights=np.abs(drops[p])))) for p in parts])
        else:
            d, mid = drops[ks], ks
        drop.append(d)
        eta.append(lr[mid])
        since.append(area[t] - area[mid - 1])  # S_k(t) = sum_{tau=k..t} eta_tau
        counts.append(d.size)
    return area[at], np.concatenate(drop), np.concatenate(eta), np.concatenate(since), np.array(counts)


def _inputs(area, drop, eta, since, counts) -> dict:
    """Predict's inputs: per point `area`, `logarea`; per term `drop`, `logeta`, `since`; and each
    point's terms as the slice ends[i-1]:ends[i] of the term arrays (`ends`, cumulative counts)."""
    return {"area": area, "logarea": np.log(np.maximum(area, 1e-300)), "drop": drop,
            "logeta": np.log(np.maximum(eta, 1e-300)), "since": since, "ends": np.cumsum(counts)}


def curve_inputs(steps, lrs, at_steps, groups: int | None = GROUPS) -> dict:
    """The law's inputs for one run's points at `at_steps`, from its logged (step, lr) pairs."""
    at_steps = np.asarray(at_steps)
    lr = per_step_lr(steps, lrs, int(np.max(at_steps)))
    return _inputs(*_drop_terms(lr, at_steps, groups))


def _prepare(frame) -> dict:
    at_steps = np.asarray(frame["step"], float).astype(int)
    area = np.empty(len(at_steps))
    counts = np.zeros(len(at_steps), dtype=int)
    terms: dict[int, tuple] = {}
    for idx, steps, lrs in curve_runs(frame):
        lr = per_step_lr(steps, lrs, int(at_steps[idx].max()))
        area[idx], drop, eta, since, counts[idx] = _drop_terms(lr, at_steps[idx], GROUPS)
        bounds = np.concatenate([[0], np.cumsum(counts[idx])])
        for j, i in enumerate(idx):  # keep the terms in row order
            terms[int(i)] = (drop[bounds[j]:bounds[j + 1]], eta[bounds[j]:bounds[j + 1]], since[bounds[j]:bounds[j + 1]])
    ordered = [terms[i] for i in range(len(at_steps))]
    empty = np.zeros(0)
    drop, eta, since = (np.concatenate([t[k] for t in ordered] + [empty]) for k in range(3))
    return _inputs(area, drop, eta, since, counts)


def _per_point(values: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Sum (S, m) term values into (S, n) points whose terms end at `ends` (cumulative counts)."""
    total = np.concatenate([np.zeros((values.shape[0], 1)), np.cumsum(values, axis=1)], axis=1)
    return total[:, ends] - total[:, np.concatenate([[0], ends[:-1]])]


def _parts(theta, x):
    """(L, power term, loss drop, term pieces) for S parameter vectors: (S, n) and (S, m) arrays."""
    log_l0, log_a, alpha, log_b, log_c, beta, gamma = (theta[:, i : i + 1] for i in range(7))
    power = np.exp(log_a - alpha * x["logarea"])
    # per term: x_k = eta_k^(-gamma)·S_k(t); u = C·x_k + 1; G = 1 - u^(-beta)
    scaled = np.exp(log_c - gamma * x["logeta"]) * x["since"]
    log_u = np.log1p(scaled)
    u_pow = np.exp(-beta * log_u)
    drop = x["drop"]
    loss_drop = np.exp(log_b) * _per_point(drop * (1.0 - u_pow), x["ends"])
    value = np.exp(log_l0) + power - loss_drop
    return value, power, loss_drop, (drop, scaled, log_u, u_pow, beta, log_b)


def _predict(theta, x):
    value = _parts(theta, x)[0]
    return np.log(np.maximum(value, 1e-300))


def _jacobian(theta, x):
    value, power, loss_drop, (drop, scaled, log_u, u_pow, beta, log_b) = _parts(theta, x)
    value = np.maximum(value, 1e-300)
    b = np.exp(log_b)
    ends = x["ends"]
    # dG/dlog C = beta·u^(-beta-1)·C·x_k ; dG/dgamma = -log(eta_k)·dG/dlog C ; dG/dbeta = u^(-beta)·log u
    d_log_c = beta * u_pow / (1.0 + scaled) * scaled
    columns = [
        np.exp(theta[:, 0:1]) * np.ones_like(value),                 # d/d log L0
        power,                                                        # d/d log A
        -power * x["logarea"],                                        # d/d alpha
        -loss_drop,                                                   # d/d log B
        -b * _per_point(drop * d_log_c, ends),                        # d/d log C
        -b * _per_point(drop * u_pow * log_u, ends),                  # d/d beta
        b * _per_point(drop * d_log_c * x["logeta"], ends),           # d/d gamma
    ]
    return np.stack(columns, axis=-1) / value[..., None]


MULTIPOWER = register(Law(
    name="multipower",
    formula="L(t) = L0 + A * (S1 + S_W)^(-alpha) - B * sum_k (eta_(k-1) - eta_k) * G(eta_k^(-gamma) * S_k(t)), "
            "G(x) = 1 - (C x + 1)^(-beta)",
    inputs=("step", "lr"),
    params=(
        Param("log_l0", "L0", True, (-8.0, 5.0), (0.0, 0.7, 1.4)),
        Param("log_a", "A", True, (-20.0, 20.0), (-1.0, 1.0)),
        Param("alpha", "alpha", False, (1e-3, 3.0), (0.3, 0.8)),
        Param("log_b", "B", True, (-20.0, 20.0), (2.0, 6.0)),
        Param("log_c", "C", True, (-20.0, 20.0), (-1.0, 2.0)),
        Param("beta", "beta", False, (1e-3, 5.0), (0.3, 1.0)),
        Param("gamma", "gamma", False, (0.0, 2.0), (0.3, 0.7)),
    ),
    space="log",
    predict=_predict,
    jacobian=_jacobian,
    prepare=_prepare,
    positive=("step", "loss"),
    refuse_nonpositive=("lr",),  # lr^(-gamma) and the LR area: a zero or negative LR has no meaning
    curves=True,
))


def predict_curve(theta: np.ndarray, steps, lrs, at_steps=None, groups: int | None = GROUPS) -> np.ndarray:
    """The law's loss curve for a schedule given as per-step (or logged) learning rates;
    `groups=None` evaluates the exact sum over every step."""
    at_steps = np.asarray(steps if at_steps is None else at_steps)
    return MULTIPOWER.predict_loss(theta, curve_inputs(steps, lrs, at_steps, groups))
