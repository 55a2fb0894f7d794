"""What a config implies: the resolved model, the run length, the run's schedule, and the
derived quantities run.json records and the sweep planner prints. Above config, model and data;
below train, fit and sweep, which all read it."""

from __future__ import annotations

import dataclasses
import math

from testbed.config import Config, ModelConfig, OptimConfig
from testbed.config import import_plugins as _import_modules
from testbed.errors import ConfigError
from testbed.model.counting import count_params, flops_per_token
from testbed.schedules import Schedule, check_run


def data_vocab_size(config: Config) -> int:
    """The vocabulary the data speaks, as the source `data.source` names reads it from the config
    (the synthetic spec's, the prepared shards' manifest, a user source's own)."""
    from testbed.data.loader import source_vocab_size

    return source_vocab_size(config)


def resolved_model(config: Config) -> ModelConfig:
    """The model config with vocab_size filled in from the data (and checked against it)."""
    vocab = data_vocab_size(config)
    m = config.model
    if m.vocab_size is None:
        return dataclasses.replace(m, vocab_size=vocab)
    if m.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the data's vocabulary "
                          f"({vocab}); unset it to take the data's, or raise it")
    return m


def budget_steps(flops: float, flops_per_token: int, global_batch_tokens: int) -> int:
    """Whole steps for a compute budget C: the nearest whole number of steps to
    C / (flops_per_token x global_batch_tokens), halves rounded up, at least one. The run's
    planned FLOPs are then within half a step's FLOPs of C (exact rational arithmetic, so a
    budget of exactly k steps gives k)."""
    from fractions import Fraction

    ratio = Fraction(flops) / (flops_per_token * global_batch_tokens)
    return max(1, math.floor(ratio + Fraction(1, 2)))


def planned_tokens(config: Config, n_params: int, flops_per_token: int | None = None) -> int:
    t = config.train
    if t.flops is not None:
        if flops_per_token is None:
            raise ConfigError("train.flops needs the run's FLOPs per token; use describe(config)")
        return budget_steps(t.flops, flops_per_token, t.global_batch_tokens) * t.global_batch_tokens
    if t.tokens is not None:
        tokens = t.tokens
    elif t.steps is not None:
        tokens = t.steps * t.global_batch_tokens
    elif t.tokens_per_param is not None:
        tokens = int(t.tokens_per_param * n_params)
    else:
        raise ConfigError("the run has no length; set one of train.tokens, train.steps, "
                          "train.tokens_per_param or train.flops (e.g. train.tokens_per_param=20)")
    return tokens


def run_schedule(config: Config, total_steps: int) -> Schedule:
    """The run's schedule, validated once: warmup fraction resolved and, for power, Shen et al.'s
    beta taken as the batch in sequences (n, the tokens seen, stays in tokens). The trainer then
    calls its `lr` and `phase` every step without validating again."""
    schedule = config.schedule.for_run(total_steps, config.train.global_batch_tokens // config.data.seq_len)
    check_run(schedule, total_steps, config.optim.lr, config.train.global_batch_tokens)
    return schedule


def import_plugins(config: Config) -> None:
    """Import the modules named in `imports` (config loading already did; kept for callers
    that build a Config by hand)."""
    _import_modules(config.imports)


def check_registered(model: ModelConfig, optim: OptimConfig | None = None) -> None:
    """Name every unknown part or optimiser before anything trains (nearest registered name
    included), so a sweep with a bad name is rejected at planning instead of failing every run."""
    from testbed.model.counting import is_builtin

    if optim is not None:
        from testbed.optim import OPTIMIZERS  # torch-free at import

        OPTIMIZERS.get(optim.name)
    if is_builtin(model) and model.init in ("normal", "scaled"):
        return
    from testbed.model import transformer as t

    for registry, value in ((t.NORMS, model.norm), (t.PLACEMENTS, model.norm_placement),
                            (t.ATTENTIONS, model.attention), (t.MLPS, model.mlp),
                            (t.POSITIONS, model.position), (t.INITS, model.init)):
        registry.get(value)


def describe(config: Config) -> dict:
    import_plugins(config)
    model = resolved_model(config)
    check_registered(model, config.optim)
    counts = count_params(model)
    seq_len = config.data.seq_len
    gbt = config.train.global_batch_tokens
    fpt = flops_per_token(model, seq_len)
    steps = max(1, math.ceil(planned_tokens(config, counts.total, fpt) / gbt))
    tokens = steps * gbt  # whole steps: the run trains exactly this many tokens
    run_schedule(config, steps)
    unique = config.data.unique_tokens
    return {
        "n_params": counts.total,
        "n_params_non_embedding": counts.non_embedding,
        "n_params_embedding": counts.embedding,
        "flops_per_token": fpt,
        "vocab_size": model.vocab_size,
        "d_model": model.d_model,
        "n_layers": model.n_layers,
        "n_heads": model.n_heads,
        "seq_len": seq_len,
        "global_batch_tokens": gbt,
        "planned_steps": steps,
        "planned_tokens": tokens,
        "planned_flops": fpt * tokens,
        "unique_tokens": unique,
        "epochs": tokens / unique if unique else 1.0,
        "schedule": config.schedule.name,
        "peak_lr": config.optim.lr,
    }


def short(x: float) -> str:
    """A count in three significant figures with a k/M/B/T suffix: 1.23M."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def sci(x: float) -> str:
    """FLOPs the way papers write them: 7.13e12."""
    return f"{x:.3g}".replace("e+", "e")


def headline(info: dict) -> str:
    """What a run is, in one line: N (total and non-embedding), D, steps and batch, C."""
    return (f"N {short(info['n_params'])} ({short(info['n_params_non_embedding'])} non-embedding), "
            f"D {short(info['planned_tokens'])} tokens = {info['planned_steps']:,} steps x "
            f"{info['global_batch_tokens']:,}, C {sci(info['planned_flops'])} FLOPs")


def plan_lines(config: Config, info: dict | None = None) -> list[str]:
    """The plan `testbed train --dry-run` prints: size, length, batch and the resolved schedule."""
    info = info or describe(config)
    steps, seq = info["planned_steps"], info["seq_len"]
    schedule = run_schedule(config, steps).to_dict()
    shape = ", ".join(f"{k} {v}" for k, v in schedule.items() if k != "name" and v is not None)
    return [headline(info),
            f"model d_model {info['d_model']}, n_layers {info['n_layers']}, n_heads {info['n_heads']}, "
            f"vocab {info['vocab_size']}; {short(info['flops_per_token'])} FLOPs per token",
            f"batch {info['global_batch_tokens']:,} tokens = {info['global_batch_tokens'] // seq} sequences "
            f"of {seq}; epochs {info['epochs']:.3g}",
            f"schedule {schedule['name']}, peak lr {info['peak_lr']:g}" + (f" ({shape})" if shape else "")]
