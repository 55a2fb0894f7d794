"""Sweep files: parse, expand the axes into runs, compute derived fields and run ids.

A sweep is YAML:

    name: widths
    base: ../base.yaml            # or an inline mapping of config sections
    grid:                         # cartesian product over every key
      model.d_model: [32, 64]
    zip:                          # varied together (lists of equal length)
      optim.lr: [3e-3, 1e-3]
      train.seed: [0, 1]
    derived:                      # evaluated in order for every run, see expr.py
      train.tokens: "20 * n_params"
    labels: [model.d_model]       # default: every axis key
    runs_per_gpu: auto            # runs trained at once on one GPU (an integer, or auto)

Runs = product(grid) x zip. A run id is `<label slug>-<10 hex>`, the hex being a hash of the
resolved config without the keys that cannot change the result (name, labels, logging, and the
preset name once its values are filled in), so editing a sweep keeps the ids of unchanged runs.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.config import Config, config_hash, from_dict, merge, read_yaml, set_dotted
from testbed.errors import ConfigError
from testbed.sweep.expr import axis_values, evaluate
from testbed.sweep.quantities import describe, expression_names

SWEEP_KEYS = ("name", "description", "base", "grid", "zip", "derived", "labels", "runs_per_gpu")
SLUG_CHARS = 60
# runs_per_gpu: auto packs at most this many runs onto one GPU, into at most this share of its
# memory (the rest is headroom: allocator fragmentation, a compiled step's workspace).
MAX_RUNS_PER_GPU = 8
USABLE_GPU_FRACTION = 0.9
# Fixed cost of one more CUDA process: its context, cuBLAS/cuDNN workspaces, kernels loaded.
PROCESS_OVERHEAD_BYTES = 1536 * 2**20
LOSS_CHUNK_LOGITS = 2**28  # testbed.model.loss.CHUNK_LOGITS


@dataclass
class PlannedRun:
    run_id: str
    config_hash: str
    labels: dict[str, Any]
    config: Config
    quantities: dict[str, Any] = field(default_factory=dict)

    def config_tree(self) -> dict[str, Any]:
        return self.config.to_dict()


@dataclass
class Sweep:
    name: str
    runs: list[PlannedRun]
    source: str | None = None
    description: str | None = None
    runs_per_gpu: int | str = "auto"  # an integer >= 1, or "auto" (see choose_runs_per_gpu)


def load_sweep(source: str | Path | dict[str, Any]) -> Sweep:
    """Read a sweep file (or mapping) and expand it into validated runs."""
    if isinstance(source, dict):
        spec, folder, where = source, Path.cwd(), "sweep"
    else:
        path = Path(source)
        spec, folder, where = read_yaml(path), path.resolve().parent, str(path)
    check_keys(spec, where)
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"{where}: name={name!r} must be a word of letters, digits, '_', '.' "
                          f"or '-', e.g. name: widths")
    base = load_base(spec.get("base"), folder, where)
    grid = axis_mapping(spec.get("grid"), "grid", where)
    zipped = axis_mapping(spec.get("zip"), "zip", where)
    derived = spec.get("derived") or {}
    if not isinstance(derived, dict):
        raise ConfigError(f"{where}: derived={derived!r} must be a mapping of dotted key -> "
                          f"expression, e.g. train.tokens: '20 * n_params'")
    check_overlaps(grid, zipped, derived, where)
    label_keys = label_names(spec.get("labels"), list(grid) + list(zipped), where)

    runs: list[PlannedRun] = []
    seen: dict[str, PlannedRun] = {}
    for assignment in expand(grid, zipped, where):
        config = resolve_run(base, assignment, derived, where)
        tree = config.to_dict()
        labels = {short: dotted(tree, key) for short, key in label_keys.items()}
        config.labels = {**config.labels, **labels}
        config_hash = hash_config(config)
        if config_hash in seen:
            raise ConfigError(f"{where}: runs {seen[config_hash].labels} and {labels} resolve to "
                              f"the same config; remove the duplicate axis value or make the "
                              f"axes change the config")
        run_id = f"{slug(labels)}-{config_hash}" if labels else config_hash
        config.name = f"{name}/{run_id}"
        try:
            quantities = describe(config)  # also checks every registered name the trainer looks up
        except ConfigError as err:
            raise ConfigError(f"{where}: run {assignment}: {err}") from None
        run = PlannedRun(run_id=run_id, config_hash=config_hash, labels=labels, config=config,
                         quantities=quantities)
        seen[config_hash] = run
        runs.append(run)
    return Sweep(name=name, runs=runs, source=None if isinstance(source, dict) else str(source),
                 description=spec.get("description"),
                 runs_per_gpu=runs_per_gpu_setting(spec.get("runs_per_gpu", "auto"), where))


def check_keys(spec: dict[str, Any], where: str) -> None:
    for key in spec:
        if key not in SWEEP_KEYS:
            near = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(SWEEP_KEYS)}"
            raise ConfigError(f"{where}: unknown sweep key {key!r}; {hint}")


def load_base(base: Any, folder: Path, where: str) -> dict[str, Any]:
    if base is None:
        return {}
    if isinstance(base, str):
        path = Path(base) if Path(base).is_absolute() else folder / base
        if not path.is_file():
            raise ConfigError(f"{where}: base={base!r} does not exist (looked for {str(path)!r}); "
                              f"give a config path relative to the sweep file")
        return read_yaml(path)
    if isinstance(base, dict):
        return merge({}, base)
    raise ConfigError(f"{where}: base={base!r} must be a config mapping or the path of a config "
                      f"YAML relative to the sweep file")


def axis_mapping(axes: Any, kind: str, where: str) -> dict[str, list[Any]]:
    if axes is None:
        return {}
    if not isinstance(axes, dict):
        raise ConfigError(f"{where}: {kind}={axes!r} must be a mapping of dotted config key -> "
                          f"list of values, e.g. model.d_model: [32, 64]")
    out = {}
    for key, values in axes.items():
        if isinstance(values, str):  # a helper: simplex(names=[a, b], step=0.25) (expr.py)
            try:
                values = axis_values(values, str(key))
            except ConfigError as err:
                raise ConfigError(f"{where}: {kind} {err}") from None
        if not isinstance(values, list):
            raise ConfigError(f"{where}: {kind} axis {key}={values!r} must be a list of values, "
                              f"e.g. {key}: [{values!r}]")
        if not values:
            raise ConfigError(f"{where}: {kind} axis {key}=[] is empty, so the sweep has no runs; "
                              f"give at least one value")
        out[str(key)] = values
    if kind == "zip" and len({len(v) for v in out.values()}) > 1:
        lengths = {k: len(v) for k, v in out.items()}
        raise ConfigError(f"{where}: zip axes have different lengths {lengths}; zip lists are "
                          f"varied together, so give them equal lengths")
    return out


def check_overlaps(grid: dict[str, Any], zipped: dict[str, Any], derived: dict[str, Any],
                   where: str) -> None:
    for key in grid:
        if key in zipped:
            raise ConfigError(f"{where}: {key!r} is both a grid and a zip axis; keep it in one")
    for key in derived:
        if key in grid or key in zipped:
            raise ConfigError(f"{where}: derived field {key!r} is also an axis; drop one of them")


def label_names(labels: Any, axis_keys: list[str], where: str) -> dict[str, str]:
    """Map short label name -> axis key (the last dotted part, longer where two collide)."""
    if labels is None:
        keys = axis_keys
    elif isinstance(labels, dict):
        return {str(short): str(key) for short, key in labels.items()}
    elif isinstance(labels, list):
        keys = [str(k) for k in labels]
        for key in keys:
            if key not in axis_keys:
                raise ConfigError(f"{where}: label {key!r} is not an axis key; choose among "
                                  f"{', '.join(axis_keys) or '(no axes)'}")
    else:
        raise ConfigError(f"{where}: labels={labels!r} must be a list of axis keys")
    shorts: dict[str, str] = {}
    for key in keys:
        parts = key.split(".")
        depth = 1
        while ".".join(parts[-depth:]) in shorts and depth < len(parts):
            depth += 1
        shorts[".".join(parts[-depth:]).replace(".", "_")] = key
    return shorts


def expand(grid: dict[str, list[Any]], zipped: dict[str, list[Any]],
           where: str) -> list[dict[str, Any]]:
    zip_rows = list(zip(*zipped.values())) if zipped else [()]
    out = []
    for combo in itertools.product(*grid.values()):
        for row in zip_rows:
            out.append({**dict(zip(grid, combo)), **dict(zip(zipped, row))})
    if not out:
        raise ConfigError(f"{where}: the axes expand to no runs; give every axis at least one value")
    return out


def resolve_run(base: dict[str, Any], assignment: dict[str, Any], derived: dict[str, Any],
                where: str) -> Config:
    tree = copy.deepcopy(base)  # set_dotted writes into nested mappings
    for key, value in assignment.items():
        set_dotted(tree, key, value)
    try:
        config = from_dict(tree)
        for key, expression in derived.items():
            value = expression
            if isinstance(expression, str):
                value = evaluate(expression, expression_names(config), key)
                if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                    value = int(value)  # counts (tokens, steps, batch) must be whole numbers
            set_dotted(tree, key, value)
            config = from_dict(tree)
    except ConfigError as err:
        raise ConfigError(f"{where}: run {assignment}: {err}") from None
    return config


def dotted(tree: dict[str, Any], key: str) -> Any:
    """The resolved value of a dotted key (typed, e.g. 3e-3 read as a float)."""
    node: Any = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def hash_config(config: Config) -> str:
    return config_hash(config.to_dict())


def slug(labels: dict[str, Any]) -> str:
    parts = []
    for short, value in labels.items():
        text = format(value, "g") if isinstance(value, float) else str(value)
        parts.append(f"{short}-{re.sub(r'[^A-Za-z0-9.+-]+', '', text)}")
    return "_".join(parts)[:SLUG_CHARS].strip("_-.") or "run"


# ----------------------------------------------------------------------------- runs per GPU


def runs_per_gpu_setting(value: Any, where: str = "runs_per_gpu") -> int | str:
    """A runs_per_gpu setting checked: a whole number >= 1, or "auto" (None counts as auto)."""
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: runs_per_gpu={value!r} must be a whole number >= 1 or auto, "
                          f"e.g. runs_per_gpu: 4")
    return value


def estimate_run_memory(config: Config, quantities: dict[str, Any] | None = None) -> int | None:
    """Bytes of GPU memory one training process of this config needs, roughly: fp32 weights,
    gradients, two AdamW moments, the logging step's copy of the weights (and the EMA copy);
    the activations of one micro-batch (all of a process's batch when micro_batch_size is
    unset) at 34 x d_model bytes per token and layer in bf16 (twice in fp32; about 2 x d_model
    with activation checkpointing), one loss chunk's fp32 logits, softmax and gradient; plus a
    CUDA process's fixed cost. An estimate, not a measurement: auto leaves headroom for it.
    None where it cannot be estimated (a model that cannot be described, FSDP, several
    processes per run)."""
    try:
        info = quantities if quantities and "n_params" in quantities else _describe(config)
        n_params, d_model = int(info["n_params"]), int(info["d_model"])
        n_layers, vocab = int(info["n_layers"]), int(info["vocab_size"])
        seq_len = int(info["seq_len"])
    except (KeyError, TypeError, ValueError, ConfigError):
        return None
    train = config.train
    if train.parallel != "ddp":
        return None
    states = (4 + 4 + 8 + 4 + (4 if train.ema_decay else 0)) * n_params
    micro = train.micro_batch_size or max(1, train.global_batch_tokens // seq_len)
    tokens = micro * seq_len
    width = 2 if train.precision in ("auto", "bf16") else 4  # auto is bf16 on CUDA
    per_layer = (2 if train.activation_checkpointing else 34) * d_model * width // 2
    # The loss is computed in chunks of tokens (testbed/model/loss.py, CHUNK_LOGITS, not
    # imported: it would import torch): one chunk's fp32 logits, softmax and gradient at once.
    logits = min(tokens, max(1, LOSS_CHUNK_LOGITS // vocab)) * vocab * 12
    activations = tokens * n_layers * per_layer + logits
    return states + activations + PROCESS_OVERHEAD_BYTES


def _describe(config: Config) -> dict[str, Any]:
    from testbed.plan import describe as describe_run

    return describe_run(config)


def choose_runs_per_gpu(setting: int | str, configs: list[Config], gpu_memory: int | None, *,
                        cap: int = MAX_RUNS_PER_GPU,
                        quantities: list[dict[str, Any]] | None = None) -> int:
    """Runs to train at once on one GPU. An integer setting is taken as it is. auto: as many
    copies of the largest run's memory estimate as fit into USABLE_GPU_FRACTION of the GPU's
    memory (`gpu_memory` bytes), at most `cap`; 1 when the GPU's memory is unknown, when a
    run cannot be estimated, or when the largest run needs more than that share split in two."""
    if setting != "auto":
        return int(setting)
    if not gpu_memory or not configs:
        return 1
    estimates = [estimate_run_memory(c, quantities[i] if quantities else None)
                 for i, c in enumerate(configs)]
    if any(e is None or e <= 0 for e in estimates):
        return 1
    largest = max(e for e in estimates if e is not None)
    return max(1, min(cap, int(USABLE_GPU_FRACTION * gpu_memory // largest)))


def sweep_runs_per_gpu(sweep: Sweep, gpu_memory: int | None, override: int | str | None = None) -> int:
    """The sweep's runs per GPU: `override` (the command line's) before the sweep file's setting."""
    setting = sweep.runs_per_gpu if override is None else override
    return choose_runs_per_gpu(setting, [r.config for r in sweep.runs], gpu_memory,
                               quantities=[r.quantities for r in sweep.runs])
