"""A run's size and cost before training, and the names derived sweep fields may use.

The numbers are the trainer's own (`testbed.plan.describe`), so a plan and the run.json
the run later writes always agree.
"""

from __future__ import annotations

from typing import Any

from testbed.config import Config
from testbed.errors import ConfigError
from testbed.plan import describe


def expression_names(config: Config) -> dict[str, Any]:
    """Names a derived expression may use: the run's quantities, shape shortcuts and the config."""
    tree = config.to_dict()
    names: dict[str, Any] = dict(tree)  # sections, for dotted keys such as model.d_model
    try:
        names.update(describe(config))
    except ConfigError:
        # Duration not known yet (e.g. tokens are themselves derived): size-only names.
        from testbed.model.counting import count_params, flops_per_token
        from testbed.plan import resolved_model

        model = resolved_model(config)
        counts = count_params(model)
        names.update(n_params=counts.total, n_params_non_embedding=counts.non_embedding,
                     n_params_embedding=counts.embedding, vocab_size=model.vocab_size,
                     flops_per_token=flops_per_token(model, config.data.seq_len))
    names.update(d_model=config.model.d_model, n_layers=config.model.n_layers,
                 n_heads=config.model.n_heads, seq_len=config.data.seq_len,
                 global_batch_tokens=config.train.global_batch_tokens)
    return names
