"""Robust estimation of a law's parameters from many starting points at once.

Objective: the sum over points of Huber_delta(residual), the residual being log(loss) minus the
law's predicted log-loss (or the raw difference for laws fitted in raw space). Two options change
it: point weights (`--weight compute`: each point counts in proportion to its compute), and an
asymmetry w (`--objective asymmetric:w`): a residual below zero, where the law predicts more than
was observed, counts w times, so the fit settles under the points, towards their lower envelope
(the best loss reachable at each size, which noise and bad runs only ever raise).

Why not simply run L-BFGS-B from every start of the grid: on the Chinchilla points that takes
minutes. Instead every start advances together: a batched Levenberg-Marquardt on the
iteratively reweighted (Huber) least-squares problem evaluates all starts in a few array
operations per iteration. The grid is screened this way, the most promising candidates run
longer, and the best few distinct ones are polished with L-BFGS-B using the analytic gradient.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from testbed.errors import TestbedError
from testbed.fit.laws import Law
from testbed.progress import Progress

_CHUNK_ELEMENTS = 4_000_000  # starts x points x params per batch, to bound memory
AT_BOUND_TOL = 1e-3  # a parameter within this fraction of its range from a bound is "at bound"
FLAT_STEP = 0.05  # flatness probe: move a parameter by this fraction of its range...
FLAT_RISE = 1e-6  # ...and call it flat when the objective rises by less than this, relatively


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


@dataclass
class FitResult:
    law: Law
    theta: np.ndarray  # every internal parameter, in law order
    objective: float
    converged: bool
    message: str
    at_bound: list[str]
    n_points: int
    n_starts: int
    variant: str = "free"
    fixed: dict[str, float] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    candidates: np.ndarray | None = None  # best distinct optima, reused as bootstrap starts
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)  # internal overrides
    flat: list[str] = field(default_factory=list)  # parameters the objective barely depends on
    asymmetry: float = 1.0  # weight of over-predictions (residual < 0) in the objective

    @property
    def params(self) -> dict[str, float]:
        return self.law.public(self.theta)

    @property
    def n_free(self) -> int:
        return len(self.law.params) - len(self.fixed) - len(self.tied)

    def predict(self, x: dict) -> np.ndarray:
        return self.law.predict_loss(self.theta, x)


class _Problem:
    """The reduced (free-parameter) problem: maps free vectors to full ones and evaluates."""

    def __init__(self, law: Law, x: dict, y: np.ndarray, delta: float, fixed: dict, tied: dict,
                 bounds: dict | None = None, point_weights: np.ndarray | None = None, asymmetry: float = 1.0):
        self.law, self.x, self.delta = law, x, delta
        self.point_weights = np.ones(len(y)) if point_weights is None else np.asarray(point_weights, float)
        self.asymmetry = float(asymmetry)
        bounds = bounds or {}
        self.target = np.log(y) if law.space == "log" else np.asarray(y, float)
        names = law.names
        self.fixed = {names.index(k): v for k, v in fixed.items()}
        self.tied = {names.index(k): names.index(v) for k, v in tied.items()}
        self.free = [i for i in range(len(names)) if i not in self.fixed and i not in self.tied]
        limits = [bounds.get(law.params[i].name, law.params[i].bounds) for i in self.free]
        self.lower = np.array([lo for lo, _ in limits], dtype=float)
        self.upper = np.array([hi for _, hi in limits], dtype=float)
        # full = free @ mapping (+ fixed values): tied columns copy their source's column.
        self.mapping = np.zeros((len(self.free), len(names)))
        for j, i in enumerate(self.free):
            self.mapping[j, i] = 1.0
        for i, src in self.tied.items():
            self.mapping[self.free.index(src), i] = 1.0
        self.offset = np.zeros(len(names))
        for i, v in self.fixed.items():
            self.offset[i] = v

    def full(self, free: np.ndarray) -> np.ndarray:
        return np.atleast_2d(free) @ self.mapping + self.offset

    def residuals(self, free: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return self.target - self.law.predict(self.full(free), self.x)

    def scale(self, r: np.ndarray) -> np.ndarray:
        """Each residual's weight in the objective: its point's weight, times the asymmetry
        where the law over-predicts (r < 0)."""
        if self.asymmetry == 1.0:
            return np.broadcast_to(self.point_weights, r.shape)
        return self.point_weights * np.where(r < 0, self.asymmetry, 1.0)

    def objective(self, free: np.ndarray) -> np.ndarray:
        r = self.residuals(free)
        obj = (self.scale(r) * huber(r, self.delta)).sum(axis=1)
        return np.where(np.isfinite(obj), obj, np.inf)

    def jacobian(self, free: np.ndarray) -> np.ndarray:
        """d prediction / d free parameters, shape (S, n, F)."""
        full = self.full(free)
        if self.law.jacobian is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                jac = self.law.jacobian(full, self.x)
        else:
            jac = self._numeric_jacobian(full)
        return jac @ self.mapping.T

    def _numeric_jacobian(self, full: np.ndarray) -> np.ndarray:
        cols = []
        with np.errstate(over="ignore", invalid="ignore"):
            for i in range(full.shape[1]):
                h = 1e-6 * np.maximum(1.0, np.abs(full[:, i : i + 1]))
                up, down = full.copy(), full.copy()
                up[:, i : i + 1] += h
                down[:, i : i + 1] -= h
                cols.append((self.law.predict(up, self.x) - self.law.predict(down, self.x)) / (2 * h))
        return np.stack(cols, axis=-1)

    def value_and_grad(self, free: np.ndarray) -> tuple[float, np.ndarray]:
        r = self.residuals(free)[0]
        scale = self.scale(r)
        obj = float((scale * huber(r, self.delta)).sum())
        if not np.isfinite(obj):
            return 1e300, np.zeros(len(self.free))
        psi = scale * np.clip(r, -self.delta, self.delta)
        grad = -(self.jacobian(free)[0].T @ psi)
        return obj, np.where(np.isfinite(grad), grad, 0.0)

    def clip(self, free: np.ndarray) -> np.ndarray:
        return np.clip(free, self.lower, self.upper)


def _lm_batch(problem: _Problem, starts: np.ndarray, iterations: int,
              weights: np.ndarray | None = None, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Batched Levenberg-Marquardt on the Huber (IRLS) majoriser; returns (thetas, objectives).

    `weights` (S, n) gives each start its own point weights: a bootstrap replicate is the
    original data with each run weighted by how often it was drawn, so all replicates are
    fitted together in the same array operations. `progress` advances by one per iteration.
    """
    delta = problem.delta
    theta = problem.clip(starts.copy())
    w = np.ones((1, problem.target.size)) if weights is None else weights
    r = problem.residuals(theta)
    obj = np.where(np.isfinite(r).all(axis=1), (w * problem.scale(r) * huber(r, delta)).sum(axis=1), np.inf)
    damping = np.full(len(theta), 1e-2)
    eye = np.eye(theta.shape[1])
    jac = None
    changed = np.ones(len(theta), dtype=bool)
    for _ in range(iterations):
        # Only starts whose parameters moved need a new Jacobian.
        if jac is None or changed.all():
            jac = problem.jacobian(theta)
        elif changed.any():
            jac[changed] = problem.jacobian(theta[changed])
        jac = np.where(np.isfinite(jac), jac, 0.0)
        r_ok = np.where(np.isfinite(r), r, 0.0)
        w_r = w * problem.scale(r_ok)  # the asymmetry follows each residual's current sign
        psi = w_r * np.clip(r_ok, -delta, delta)
        weight = w_r * np.where(np.abs(r_ok) > delta, delta / np.maximum(np.abs(r_ok), 1e-300), 1.0)
        jac_t = jac.transpose(0, 2, 1)
        grad = np.matmul(jac_t, psi[..., None])  # minus the objective's gradient, (S, F, 1)
        hess = np.matmul(jac_t * weight[:, None, :], jac)
        diag = np.einsum("sff->sf", hess)
        scale = diag.max(axis=1, keepdims=True) * 1e-9 + 1e-12
        system = hess + (damping[:, None, None] * (diag + scale)[:, :, None]) * eye
        try:
            step = np.linalg.solve(system, grad)[..., 0]
        except np.linalg.LinAlgError:
            step = np.stack([np.linalg.lstsq(m, g, rcond=None)[0][:, 0] for m, g in zip(system, grad)])
        step = np.where(np.isfinite(step), step, 0.0)
        trial = problem.clip(theta + step)
        trial_r = problem.residuals(trial)
        trial_obj = (w * problem.scale(trial_r) * huber(trial_r, delta)).sum(axis=1)
        trial_obj = np.where(np.isfinite(trial_obj), trial_obj, np.inf)
        changed = trial_obj < obj
        theta = np.where(changed[:, None], trial, theta)
        r = np.where(changed[:, None], trial_r, r)
        obj = np.where(changed, trial_obj, obj)
        damping = np.clip(np.where(changed, damping / 3.0, damping * 4.0), 1e-12, 1e12)
        if progress is not None:
            progress.update()
    return theta, obj


def _grid(problem: _Problem) -> np.ndarray:
    grids = [problem.law.params[i].grid for i in problem.free]
    return np.array(list(itertools.product(*grids)), dtype=float).reshape(-1, len(problem.free))


def _distinct(thetas: np.ndarray, objs: np.ndarray, count: int) -> list[int]:
    chosen: list[int] = []
    for i in np.argsort(objs):
        if not np.isfinite(objs[i]):
            break
        if all(np.max(np.abs(thetas[i] - thetas[j])) > 1e-3 for j in chosen):
            chosen.append(int(i))
        if len(chosen) == count:
            break
    return chosen


def resolve_constraints(law: Law, variant: str, fixed: dict[str, float] | None):
    """Internal fixed values and ties for a variant; `fixed` holds public names -> values."""
    spec = law.variant(variant)
    fixed = dict(fixed or {})
    for public in spec.fixed:
        if public not in fixed:
            raise TestbedError(
                f"--variant {variant} needs a value for {public}; pass --fix {public}=VALUE."
            )
    internal = {law.param(k).name: law.param(k).to_internal(v) for k, v in fixed.items()}
    return internal, dict(spec.tied)


def resolve_bounds(law: Law, bounds: dict[str, tuple[float, float]] | None) -> dict[str, tuple[float, float]]:
    """Internal bounds from public ones (`--bounds alpha=0.1:0.6`, `--bounds A=1:1e4`)."""
    out = {}
    for public, (lo, hi) in (bounds or {}).items():
        param = law.param(public)
        if not lo < hi:
            raise TestbedError(f"--bounds {public}={lo:g}:{hi:g} is empty; give LOW:HIGH with LOW < HIGH.")
        if param.log and lo <= 0:
            raise TestbedError(f"--bounds {public}={lo:g}:{hi:g}: {public} is positive (fitted in log space); "
                               f"give a LOW above 0.")
        out[param.name] = (param.to_internal(lo), param.to_internal(hi))
    return out


def flat_parameters(problem: _Problem, theta_free: np.ndarray, objective: float) -> list[str]:
    """Parameters along which the objective is flat: the Gauss-Newton Hessian (Huber weights,
    each parameter scaled by its bound range) has a direction where moving FLAT_STEP of the range
    raises the objective by less than FLAT_RISE of itself; the parameters that make up such a
    direction (a ridge such as A + E when alpha = 0) are reported."""
    if not problem.free:
        return []
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        jac = problem.jacobian(theta_free[None, :])[0]
        r = problem.residuals(theta_free)[0]
        weight = np.where(np.abs(r) > problem.delta, problem.delta / np.abs(r), 1.0) * problem.scale(r)
    jac = np.where(np.isfinite(jac), jac, 0.0) * (problem.upper - problem.lower)
    weight = np.where(np.isfinite(weight), weight, 0.0)
    hess = jac.T @ (jac * weight[:, None])
    values, vectors = np.linalg.eigh(hess)
    limit = 2 * FLAT_RISE * max(objective, 1e-12) / FLAT_STEP**2
    flat: list[str] = []
    for k in np.flatnonzero(values < limit):
        for j in np.flatnonzero(np.abs(vectors[:, k]) > 0.3):
            name = problem.law.params[problem.free[j]].public
            if name not in flat:
                flat.append(name)
    return flat


def one_blas_thread(function):
    """Run `function` with the BLAS on one thread. A fit's matrices are small (points x
    parameters), where threaded BLAS only adds synchronisation: on 2 cores the fit tests took
    2-3x longer with OpenBLAS's default threads than with one."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # an environment set up without network: slower, same results
            return function(*args, **kwargs)
        with threadpool_limits(limits=1, user_api="blas"):
            return function(*args, **kwargs)

    return wrapped


@one_blas_thread
def fit(
    law: Law,
    x: dict,
    y: np.ndarray,
    *,
    delta: float = 1e-3,
    variant: str = "free",
    fixed: dict[str, float] | None = None,
    starts: np.ndarray | None = None,
    bounds: dict[str, tuple[float, float]] | None = None,
    point_weights: np.ndarray | None = None,
    asymmetry: float = 1.0,
    screen_iterations: int = 12,
    refine_iterations: int | None = None,
    n_polish: int = 6,
) -> FitResult:
    """Fit `law` to losses `y` at inputs `x` (see `laws.features`).

    With `starts` (full internal vectors, e.g. a previous optimum) the grid is skipped and each
    start is polished directly: that is what bootstrap resamples use. `point_weights` (one per
    point) and `asymmetry` (the weight of over-predictions) shape the objective (module docstring).
    """
    began = time.perf_counter()
    refine_iterations = law.refine_iterations if refine_iterations is None else refine_iterations
    y = np.asarray(y, dtype=float)
    internal_fixed, tied = resolve_constraints(law, variant, fixed)
    internal_bounds = resolve_bounds(law, bounds)
    problem = _Problem(law, x, y, delta, internal_fixed, tied, internal_bounds, point_weights, asymmetry)
    n_free = len(problem.free)
    if y.size <= n_free:
        raise TestbedError(
            f"law {law.name!r} ({variant}) has {n_free} free parameters but only {y.size} points "
            f"remain; give at least {n_free + 1} points or fix parameters."
        )
    # Progress in starts: the grid's screened, then the candidates polished.
    progress = Progress(f"fit {law.name} ({variant})", unit="start", leave=False)
    if starts is None:
        grid = _grid(problem)
        n_starts = len(grid)
        progress.set_total(n_starts + n_polish)
        progress.set_postfix("screening the grid")
        chunk = max(1, _CHUNK_ELEMENTS // max(1, y.size * max(n_free, 1)))
        theta_parts: list[np.ndarray] = []  # the screened starts, a chunk at a time
        obj_parts: list[np.ndarray] = []  # and their objectives
        for lo in range(0, len(grid), chunk):
            t, o = _lm_batch(problem, grid[lo : lo + chunk], screen_iterations)
            theta_parts.append(t)
            obj_parts.append(o)
            progress.update(len(t))
        thetas, objs = np.concatenate(theta_parts), np.concatenate(obj_parts)
        keep = np.argsort(objs)[: max(32, len(grid) // 20)]
        progress.set_postfix(f"refining the best {len(keep)}")
        thetas, objs = _lm_batch(problem, thetas[keep], refine_iterations)
        candidates = thetas[_distinct(thetas, objs, n_polish)]
    else:
        starts = np.atleast_2d(np.asarray(starts, dtype=float))
        n_starts = len(starts)
        candidates = problem.clip(starts[:, problem.free])
    progress.set_total(progress.n + len(candidates))
    progress.set_postfix("polishing")
    if len(candidates) == 0:
        progress.close()
        raise TestbedError(
            f"law {law.name!r} could not be evaluated at any start on these points; check that "
            "the inputs are positive and finite."
        )
    box = list(zip(problem.lower, problem.upper))  # L-BFGS-B's bounds on the free parameters
    best = None
    polished = []
    for start in candidates:
        res = minimize(
            problem.value_and_grad, start, jac=True, method="L-BFGS-B", bounds=box,
            options={"maxiter": 3000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 20},
        )
        polished.append((res.fun, res.x))
        if best is None or res.fun < best.fun:
            best = res
        progress.update()
    progress.close()
    assert best is not None  # there was a candidate (checked above)
    theta_free = best.x
    at_bound = [
        law.params[i].public
        for j, i in enumerate(problem.free)
        if min(theta_free[j] - problem.lower[j], problem.upper[j] - theta_free[j])
        <= AT_BOUND_TOL * (problem.upper[j] - problem.lower[j])
    ]
    # L-BFGS-B stops on a relative-reduction test it cannot meet at this objective's scale
    # (ABNORMAL_TERMINATION) even at an optimum; a vanishing projected gradient is convergence.
    grad = problem.value_and_grad(theta_free)[1]
    free_dir = (theta_free > problem.lower + 1e-12) & (theta_free < problem.upper - 1e-12)
    small_grad = np.max(np.abs(grad[free_dir]), initial=0.0) < 1e-7
    polished.sort(key=lambda item: item[0])
    return FitResult(
        law=law,
        theta=problem.full(theta_free)[0],
        objective=float(best.fun),
        converged=bool(best.success or small_grad),
        message=str(best.message),
        at_bound=at_bound,
        n_points=int(y.size),
        n_starts=n_starts,
        variant=variant,
        fixed={law.params[i].public: law.params[i].to_public(v) for i, v in problem.fixed.items()},
        tied={law.params[i].public: law.params[s].public for i, s in problem.tied.items()},
        seconds=time.perf_counter() - began,
        candidates=np.array([problem.full(t)[0] for _, t in polished]),
        bounds=internal_bounds,
        flat=flat_parameters(problem, theta_free, float(best.fun)),
        asymmetry=float(asymmetry),
    )


def fit_replicates(result: FitResult, x: dict, y: np.ndarray, weights: np.ndarray, *,
                   delta: float = 1e-3, iterations: int = 200, targets: np.ndarray | None = None) -> np.ndarray:
    """Refit `result`'s law for many point weightings at once, from its optimum: (K, P) thetas.
    `weights` (K, n) include any point weights of the original fit; its asymmetry is kept.
    `targets` (K, n): each replicate's own responses in the law's fit space (log-loss or loss),
    for a bootstrap that redraws the responses instead of reweighting the points."""
    law = result.law
    internal_fixed = {law.param(k).name: law.param(k).to_internal(v) for k, v in result.fixed.items()}
    tied = {law.param(k).name: law.param(v).name for k, v in result.tied.items()}
    problem = _Problem(law, x, np.asarray(y, float), delta, internal_fixed, tied, result.bounds,
                       asymmetry=result.asymmetry)
    if targets is not None:
        problem.target = np.asarray(targets, float)
    start = np.repeat(result.theta[None, problem.free], len(weights), axis=0)
    with Progress(f"bootstrap {law.name}: {len(weights)} replicates", total=iterations, unit="iteration") as progress:
        thetas, objs = _lm_batch(problem, start, iterations, weights=weights, progress=progress)
    full = problem.full(thetas)
    full[~np.isfinite(objs)] = np.nan
    return full
