"""Checks of µP (model.parametrization: mup, docs/mup.md): does a model behave the same at
every width?

    coordinate_check(config, widths, steps)  -> per width, step and layer: mean |activation|
    slope(widths, values)                    -> d log(value) / d log(width), a least-squares fit
    lr_sweep(config, widths, lrs, steps, ...) -> the final validation loss of each (width, lr)
    best_lrs(losses)                         -> per width, the lr with the lowest loss

The coordinate check (Yang et al. 2022, section D.1) trains a few AdamW steps at several
widths and records the mean absolute value of the embedding output, each block's output and the
logits on a fixed batch. Under µP those stay flat as the width grows; under SP the update of a
width-d matrix adds about lr x d to its output coordinates, so after a step or two the blocks'
outputs and the logits grow with width. `lr_sweep` is the real test: the best learning rate
found at one width should stay the best at the others (scripts/mup_transfer.py).

Both train with a small loop of the trainer's step (AdamW from testbed/optim.py, gradient
clipping, each group's lr = schedule lr x its `lr_scale`) on the config's data, in memory,
without a run directory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

from testbed.config import Config, load_config
from testbed.data import loader as data_loader
from testbed.model.transformer import Transformer
from testbed.optim import build_optimizer
from testbed.plan import resolved_model, run_schedule


def at_width(config: Config, width: int, parametrization: str, base_width: int | None = None,
             overrides: dict | None = None) -> Config:
    """The config with d_model = width under `parametrization` (n_heads kept, so d_head grows
    with the width, as µP's attention scale assumes); µP's base width defaults to the config's."""
    tree = config.to_dict()
    tree["model"].update(preset=None, depth=None, d_model=width, parametrization=parametrization,
                         mup_base_width=(base_width or config.model.mup_base_width) if parametrization == "mup"
                         else None)
    return load_config(tree, overrides)


def train_steps(config: Config, steps: int, after_step: Callable[[int, Transformer, float], None] | None = None,
                device: str = "cpu", source=None) -> list[float]:
    """Train `steps` optimiser steps of the config's model on its data (one micro-batch a step;
    `source`: the config's data source, if already made); returns the training loss of each step.
    `after_step(step, model, loss)` runs after each update, and once before the first with step 0
    and loss nan."""
    model_cfg = resolved_model(config)
    torch.manual_seed(config.train.seed)
    model = Transformer(model_cfg).to(device)
    optimizer = build_optimizer(model, config.optim, torch.device(device))
    schedule = run_schedule(config, steps)
    plan = data_loader.BatchPlan(source or data_loader.make_source(config),
                                 config.train.global_batch_tokens // config.data.seq_len,
                                 config.data.seed, config.data.unique_tokens, steps)
    clip = config.optim.grad_clip
    losses = []
    if after_step:
        after_step(0, model, math.nan)
    for step in range(steps):
        lr = schedule.lr(step, steps, config.optim.lr, config.train.global_batch_tokens)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batch = torch.from_numpy(plan.batch_tokens(step)).to(device)
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if after_step:
            after_step(step + 1, model, losses[-1])
    return losses


@torch.no_grad()
def activation_scales(model: Transformer, idx: torch.Tensor) -> dict[str, float]:
    """Mean |x| of the embedding output, each block's output and the logits for tokens idx."""
    scales: dict[str, float] = {}

    def record(name):
        return lambda module, args, out: scales.__setitem__(name, out.abs().mean().item())

    hooks = [model.embed.register_forward_hook(record("embedding"))]
    hooks += [block.register_forward_hook(record(f"block{i}")) for i, block in enumerate(model.blocks)]
    was_training = model.training
    model.eval()
    try:
        scales["logits"] = model(idx).abs().mean().item()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return scales


def coordinate_check(config: Config, widths: Iterable[int], steps: int = 4,
                     parametrizations: Iterable[str] = ("sp", "mup"), base_width: int | None = None,
                     lr: float | None = None) -> list[dict]:
    """Rows {parametrization, width, step, layer, scale} after 0..steps AdamW steps at a
    constant lr (the config's unless given), measured on the first training batch. µP's base
    width is the config's mup_base_width, else the smallest width."""
    widths = sorted(widths)
    base = base_width or config.model.mup_base_width or widths[0]
    overrides = {"schedule": {"name": "constant"}, "train.steps": steps, "model.dropout": 0.0}
    if lr is not None:
        overrides["optim.lr"] = lr
    rows = []
    source = data_loader.make_source(config)  # the data do not depend on the width
    plan = data_loader.BatchPlan(source, config.train.global_batch_tokens // config.data.seq_len,
                                 config.data.seed, config.data.unique_tokens, steps)
    probe = torch.from_numpy(plan.batch_tokens(0))[:, :-1]
    for parametrization in parametrizations:
        for width in widths:
            cfg = at_width(config, width, parametrization, base, overrides)

            def measure(step, model, loss, parametrization=parametrization, width=width):
                for layer, scale in activation_scales(model, probe).items():
                    rows.append({"parametrization": parametrization, "width": width, "step": step,
                                 "layer": layer, "scale": scale})

            train_steps(cfg, steps, measure, source=source)
    return rows


def slope(widths: Iterable[float], values: Iterable[float]) -> float:
    """Least-squares slope of log(value) against log(width): 0 flat, 1 growing like the width."""
    return float(np.polyfit(np.log(list(widths)), np.log(list(values)), 1)[0])


def slopes(rows: list[dict], step: int | None = None) -> dict[tuple[str, str], float]:
    """{(parametrization, layer): slope across widths} at `step` (default: the last)."""
    step = max(r["step"] for r in rows) if step is None else step
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        if r["step"] == step:
            series.setdefault((r["parametrization"], r["layer"]), []).append((r["width"], r["scale"]))
    return {key: slope(*zip(*sorted(points))) for key, points in series.items()}


def lr_point(config: Config, width: int, lr: float, steps: int, parametrization: str, base_width: int,
             val_sequences: int = 64) -> dict:
    """{parametrization, width, lr, loss}: the validation loss after `steps` steps, on the same
    `val_sequences` held-out windows for every run (so runs compare on equal terms; a mixture's
    are its sources' windows, weighted as the trainer weighs them); inf where training diverged."""
    from testbed.train.distributed import Dist
    from testbed.train.trainer import evaluate

    cfg = at_width(config, width, parametrization, base_width, {"optim.lr": lr, "train.steps": steps})
    source = data_loader.make_source(cfg)
    val_ids = data_loader.validation_windows(source, val_sequences)
    final = {}

    def evaluate_last(step, model, loss):
        if step == steps:
            final["loss"] = evaluate(model, source, val_ids, len(val_ids), torch.device("cpu"), torch.float32,
                                     Dist(), None)["val_loss"]

    losses = train_steps(cfg, steps, evaluate_last, source=source)
    loss = final["loss"] if np.all(np.isfinite(losses)) and math.isfinite(final["loss"]) else math.inf
    return {"parametrization": parametrization, "width": width, "lr": lr, "loss": loss}


def lr_sweep(config: Config, widths: Iterable[int], lrs: Iterable[float], steps: int,
             parametrization: str, base_width: int) -> list[dict]:
    """lr_point at every (width, lr)."""
    return [lr_point(config, width, lr, steps, parametrization, base_width) for width in widths for lr in lrs]


def best_lrs(rows: list[dict]) -> dict[tuple[str, int], float]:
    """{(parametrization, width): the lr of the lowest loss} (ties: the smaller lr)."""
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for r in rows:
        key = (r["parametrization"], r["width"])
        if key not in best or (r["loss"], r["lr"]) < best[key]:
            best[key] = (r["loss"], r["lr"])
    return {key: lr for key, (_, lr) in best.items()}


def lr_shift(rows: list[dict], parametrization: str, lrs: list[float]) -> int:
    """How many grid points the best lr moves between the narrowest and the widest width
    (positive: the wider model wants a larger lr)."""
    best = best_lrs([r for r in rows if r["parametrization"] == parametrization])
    widths = sorted(w for _, w in best)
    grid = sorted(lrs)
    return grid.index(best[(parametrization, widths[-1])]) - grid.index(best[(parametrization, widths[0])])


def coordinate_table(rows: list[dict]) -> str:
    """The last step's mean |activation| per layer and width, and its slope across widths."""
    step = max(r["step"] for r in rows)
    widths = sorted({r["width"] for r in rows})
    fitted = slopes(rows, step)
    lines = [f"mean |activation| after {step} AdamW steps; slope = d log(scale) / d log(width) "
             f"(µP: about 0; SP: grows with width)",
             f"{'param':<6}{'layer':<11}" + "".join(f"{'w=' + str(w):>11}" for w in widths) + f"{'slope':>9}"]
    for parametrization, layer in fitted:
        scale = {r["width"]: r["scale"] for r in rows
                 if r["step"] == step and (r["parametrization"], r["layer"]) == (parametrization, layer)}
        lines.append(f"{parametrization:<6}{layer:<11}" + "".join(f"{scale[w]:>11.4g}" for w in widths)
                     + f"{fitted[parametrization, layer]:>9.2f}")
    return "\n".join(lines)


def write_coordinate_report(rows: list[dict], out_dir) -> list[str]:
    """coord_check.json (every row) and coord_check.png (scale against width per layer, one
    panel per parametrization, at the last step) in out_dir."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")  # files only: the CLI runs on headless nodes
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coord_check.json").write_text(json.dumps(rows, indent=1) + "\n")
    step = max(r["step"] for r in rows)
    kinds = sorted({r["parametrization"] for r in rows}, key=["sp", "mup"].index)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.5), sharey=True, squeeze=False)
    for ax, parametrization in zip(axes[0], kinds):
        layers = dict.fromkeys(r["layer"] for r in rows if r["parametrization"] == parametrization)
        for layer in layers:
            points = sorted((r["width"], r["scale"]) for r in rows if r["step"] == step
                            and r["parametrization"] == parametrization and r["layer"] == layer)
            ax.plot(*zip(*points), marker="o", label=layer)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("d_model")
        ax.set_title(f"{parametrization}, step {step}")
    axes[0][0].set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "coord_check.png", dpi=100)
    plt.close(fig)
    return [str(out / "coord_check.json"), str(out / "coord_check.png")]
