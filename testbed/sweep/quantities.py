"""A run's size and cost before training: N, D, FLOPs, epochs (no torch needed).

The trainer's own `testbed.train.plan.describe` is used when it exists, so plans and run.json
agree; otherwise the same numbers are computed here from the closed-form counts in
testbed.model.counting.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from testbed.config import Config
from testbed.errors import ConfigError

SYNTHETIC_DEFAULT_VOCAB = 128  # the built-in synthetic language's default vocabulary


def resolve_vocab_size(config: Config) -> int:
    if config.model.vocab_size:
        return int(config.model.vocab_size)
    if config.data.source == "synthetic" and not config.data.path:
        return int(config.data.synthetic.get("vocab_size", SYNTHETIC_DEFAULT_VOCAB))
    raise ConfigError("model.vocab_size=None cannot be planned for data.source='shards'; "
                      "set model.vocab_size to the tokenizer's vocabulary size")


def describe(config: Config) -> dict[str, Any]:
    """n_params, flops_per_token, planned_steps/tokens/flops, unique_tokens, epochs, vocab_size."""
    try:
        from testbed.train.plan import describe as trainer_describe
    except ImportError:
        trainer_describe = None
    if trainer_describe is not None:
        return dict(trainer_describe(config))
    return describe_closed_form(config)


def describe_closed_form(config: Config) -> dict[str, Any]:
    from testbed.model.counting import count_params, flops_per_token

    vocab = resolve_vocab_size(config)
    model = dataclasses.replace(config.model, vocab_size=vocab)
    counts = count_params(model)
    seq_len = config.data.seq_len
    per_token = flops_per_token(model, seq_len)
    train = config.train
    batch = train.global_batch_tokens
    if train.tokens is not None:
        tokens = train.tokens
    elif train.steps is not None:
        tokens = train.steps * batch
    elif train.tokens_per_param is not None:
        tokens = train.tokens_per_param * counts.total
    else:
        raise ConfigError("train.tokens, train.steps and train.tokens_per_param are all unset; "
                          "give one of them (e.g. train.tokens_per_param=20)")
    steps = max(1, math.ceil(tokens / batch))
    planned_tokens = steps * batch
    unique = config.data.unique_tokens
    return {
        "n_params": counts.total,
        "n_params_non_embedding": counts.non_embedding,
        "n_params_embedding": counts.embedding,
        "flops_per_token": per_token,
        "planned_steps": steps,
        "planned_tokens": planned_tokens,
        "planned_flops": per_token * planned_tokens,
        "unique_tokens": unique,
        "epochs": planned_tokens / unique if unique else 1.0,
        "vocab_size": vocab,
    }


def expression_names(config: Config) -> dict[str, Any]:
    """Names a derived expression may use: the run's quantities, shape shortcuts and the config."""
    tree = config.to_dict()
    names: dict[str, Any] = dict(tree)  # sections, for dotted keys such as model.d_model
    try:
        names.update(describe_closed_form(config))
    except ConfigError:
        # Duration not known yet (e.g. tokens are themselves derived): size-only names.
        from testbed.model.counting import count_params, flops_per_token

        model = dataclasses.replace(config.model, vocab_size=resolve_vocab_size(config))
        counts = count_params(model)
        names.update(n_params=counts.total, n_params_non_embedding=counts.non_embedding,
                     n_params_embedding=counts.embedding, vocab_size=model.vocab_size,
                     flops_per_token=flops_per_token(model, config.data.seq_len))
    names.update(d_model=config.model.d_model, n_layers=config.model.n_layers,
                 n_heads=config.model.n_heads, seq_len=config.data.seq_len,
                 global_batch_tokens=config.train.global_batch_tokens)
    return names
