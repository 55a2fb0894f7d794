"""Typed configuration: dataclasses, YAML files, dotted overrides, validation.

A config file is YAML with the sections below (every key optional). Command-line overrides use
dotted keys, e.g. `optim.lr=3e-3 model.preset=1m`; values are parsed as YAML scalars.
Every mistake becomes one `ConfigError` naming the key, the value and the fix, with the nearest
valid key when a key is unknown.

`model.preset` names a rung of the model ladder (testbed/presets/models/<name>.yaml, shipped
inside the package). A preset named in the file yields to the keys the file or the command line
give (a saved config holds the preset and its resolved shape). A preset named on the command
line replaces the file's shape (PRESET_REPLACES: d_model, n_layers, n_heads, depth), and
load_config says so in `notes`; shape keys given on the command line still win over it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError
from testbed.registry import defaults, import_modules, registry_for
from testbed.rundir import HASH_AT_DEFAULT, hash_tree
from testbed.schedules import DEFAULT_SCHEDULE, SCHEDULES, Schedule, schedule_class, split_section

# The ladder ships as package data next to this module, so an installed wheel finds it without
# a checkout.
PRESETS_DIR = Path(__file__).resolve().parent / "presets" / "models"
# The metadata of a field added after runs were first registered: the run id leaves it out while
# it is at its default, so the ids of runs that do not use it stay as they were (config_hash).
ADDED_LATER = {HASH_AT_DEFAULT: False}


def presets_dir() -> Path:
    """Where the model ladder's presets live: TESTBED_CONFIGS/models when that variable names a
    folder of one's own presets, else the ones shipped in the package."""
    override = os.environ.get("TESTBED_CONFIGS")
    return Path(override) / "models" if override else PRESETS_DIR


@dataclass
class ModelConfig:
    preset: str | None = None  # a rung of the ladder in testbed/presets/models/
    # The depth dial: n_layers = depth, d_model = depth_aspect x depth, n_heads = d_model /
    # depth_head_dim (see DEPTH_RULE); None leaves d_model, n_layers and n_heads as given.
    depth: int | None = None
    depth_aspect: int = 32  # d_model per layer under the depth dial
    depth_head_dim: int = 32  # head width under the depth dial
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads
    ffn_ratio: float = 8 / 3  # SwiGLU hidden size = ffn_ratio * d_model, rounded up
    ffn_multiple_of: int = 32
    vocab_size: int | None = None  # None: taken from the data
    max_seq_len: int = 1024
    tie_embeddings: bool = False
    norm: str = "rmsnorm"
    norm_placement: str = "pre"  # pre | peri (norm before and after each sublayer)
    norm_eps: float = 1e-5
    qk_norm: bool = False
    # The norm applied to each query and key head under qk_norm: any registered norm.
    qk_norm_type: str = field(default="rmsnorm", metadata=ADDED_LATER)
    attention: str = "sdpa"
    mlp: str = "swiglu"
    position: str = "rope"
    # The settings each part owns (the fields of the Options dataclass it registered, see
    # PART_OPTIONS and docs/ablations.md), e.g. model.norm_options.alpha=0.5; empty: its defaults.
    norm_options: dict[str, Any] = field(default_factory=dict, metadata=ADDED_LATER)
    qk_norm_options: dict[str, Any] = field(default_factory=dict, metadata=ADDED_LATER)
    attention_options: dict[str, Any] = field(default_factory=dict, metadata=ADDED_LATER)
    mlp_options: dict[str, Any] = field(default_factory=dict, metadata=ADDED_LATER)
    position_options: dict[str, Any] = field(default_factory=dict, metadata=ADDED_LATER)
    rope_theta: float = 10000.0
    init: str = "normal"
    init_std: float = 0.02
    dropout: float = 0.0
    # sp (standard) | mup (maximal update parametrization, see docs/mup.md): init, learning
    # rates, output logits and attention scale follow the width multiplier d_model / mup_base_width.
    parametrization: str = field(default="sp", metadata=ADDED_LATER)
    mup_base_width: int | None = field(default=None, metadata=ADDED_LATER)  # the d_model at which mup equals sp (where tuned values hold)
    # The head width at the base model; None: d_head / m, i.e. width grows at a fixed head count.
    # Widening by heads at a fixed head width (the depth dial) sets it to that head width.
    mup_base_head_dim: int | None = field(default=None, metadata=ADDED_LATER)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def width_mult(self) -> float:
        """µP's width multiplier m = d_model / mup_base_width (1 under sp)."""
        if self.parametrization != "mup" or self.mup_base_width is None:  # validation refuses the latter
            return 1.0
        return self.d_model / self.mup_base_width

    @property
    def d_ff(self) -> int:
        m = self.ffn_multiple_of
        return m * -(-int(round(self.ffn_ratio * self.d_model)) // m)


# A part's options key -> (its section, the key naming the part, the registry's config key).
# The registries themselves (testbed.model.transformer, testbed.optim) sit above this module:
# they are found by their config key (testbed.registry.registry_for) once registered, as a
# user's part always is by the time its config is built (its module is imported first).
PART_OPTIONS = {
    "model.norm_options": ("model", "norm", "model.norm"),
    "model.qk_norm_options": ("model", "qk_norm_type", "model.norm"),
    "model.attention_options": ("model", "attention", "model.attention"),
    "model.mlp_options": ("model", "mlp", "model.mlp"),
    "model.position_options": ("model", "position", "model.position"),
    "optim.options": ("optim", "name", "optim.name"),
    "data.source_options": ("data", "source", "data.source"),
}


@dataclass
class DataConfig:
    # A registered data source (testbed.data.loader.DATA_SOURCES): synthetic | shards | random
    # (uniform tokens, for benchmarks) | one a module in `imports` registers.
    source: str = "synthetic"
    path: str | None = None  # folder written by `testbed data prepare` (implies source=shards)
    seq_len: int = 256
    unique_tokens: int | None = None  # U: repeat the first U training tokens; None: never repeat
    seed: int = 0  # data order (and the synthetic language's training stream)
    val_sequences: int = 64  # validation windows evaluated each time
    synthetic: dict[str, Any] = field(default_factory=dict)  # SyntheticSpec fields
    # The settings the source named by `source` owns (its registered Options), e.g.
    # data.source_options.period=7; empty: its defaults.
    source_options: dict[str, Any] = field(default_factory=dict, metadata=ADDED_LATER)


# The sources the package registers (testbed.data.loader): validation knows them before the
# loader is imported; a user's source is known once its module (in `imports`) has registered it.
BUILTIN_SOURCES = ("synthetic", "shards", "random", "mixture")


def source_name(data: DataConfig) -> str:
    """The source a data section names: data.path implies shards, as it always has, unless
    data.source names a mixture (refused with a path, by validate) or a source of a user's (which
    may read data.path itself)."""
    return "shards" if data.path and data.source in BUILTIN_SOURCES and data.source != "mixture" else data.source


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    z_loss: float = field(default=0.0, metadata=ADDED_LATER)  # PaLM's z-loss weight: adds z_loss * mean(logsumexp(logits)^2); 0 disables
    # The settings the optimiser named by `name` owns (its registered Options), e.g.
    # optim.options.momentum=0.9; empty: its defaults.
    options: dict[str, Any] = field(default_factory=dict, metadata=ADDED_LATER)


@dataclass
class TaskConfig:
    """One evaluation task, scored at every validation (docs/evals.md)."""

    name: str = ""  # metrics are task/<name>/acc, task/<name>/bpb, ...
    path: str = ""  # a JSONL file, or hub:DATASET (datasets.load_dataset; needs a network)
    kind: str = "mc"  # mc: {"question" or "context", "choices", "answer"} | completion: {"context", "completion"}
    limit: int | None = None  # score only the first N examples; None: all
    delimiter: str = " "  # joins the context and each answer (lm-eval's target_delimiter)
    split: str = "validation"  # hub:DATASET only: the split to read
    subset: str | None = None  # hub:DATASET only: the dataset's configuration name


TASK_KINDS = ("mc", "completion")


@dataclass
class TrainConfig:
    tokens: int | None = None  # total training tokens D (one of tokens / steps / tokens_per_param / flops)
    steps: int | None = None
    tokens_per_param: float | None = None  # D = ratio x N (total parameters)
    flops: float | None = field(default=None, metadata=ADDED_LATER)  # compute budget C: steps = round(C / (flops_per_token x batch))
    global_batch_tokens: int = 16384  # tokens per optimizer step, across all processes
    micro_batch_size: int | None = None  # sequences per forward pass per process; None: all on a CPU, the largest that fits on CUDA
    seed: int = 0  # model initialisation and dropout
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool | None = None  # torch.compile each block; None: on CUDA, off on CPU
    # Compile the whole forward and backward of a small model into CUDA graphs
    # (torch.compile mode="reduce-overhead"): None decides per run (train/device.py use_graphs).
    cuda_graphs: bool | None = field(default=None, metadata=ADDED_LATER)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: int = 100  # steps between validations (and at the end)
    log_every: int = 10
    activation_checkpointing: bool = False
    parallel: str = "ddp"  # with several processes: ddp (replicated) | fsdp (FSDP2, sharded)
    # With several processes: a collective that waits this long for a rank (hung, stopped, on a
    # lost node) fails, and the run stops resumable instead of hanging (docs/distributed.md).
    collective_timeout_s: float = 600.0
    deterministic: bool = False  # CUDA: force deterministic kernels (slower); CPU runs are always bit-reproducible
    # Stop as failed when the training loss (a logging window's mean) climbs this many nats
    # above its lowest value since warmup ended; None disables the guard.
    divergence_nats: float | None = 3.0
    # Count a loss spike when a logged training loss is this many nats above the running mean
    # (an EMA) of the logged losses before it; None disables the count.
    spike_nats: float | None = 0.5
    # Keep an exponential moving average of the weights with this decay per step (e.g. 0.999),
    # evaluated beside the weights at every validation (val_loss_ema); None or 0 disables it.
    ema_decay: float | None = field(default=None, metadata=ADDED_LATER)
    # Multiple-choice and completion tasks scored at every validation (docs/evals.md); they
    # need a text tokenizer, so a prepared data.path.
    tasks: list[TaskConfig] = field(default_factory=list)


@dataclass
class CheckpointConfig:
    every: int | None = None  # science checkpoint every k steps
    log_spaced: int = 0  # this many log-spaced science checkpoints over the run
    at_tokens: list[int] = field(default_factory=list)  # science checkpoints at these token counts
    rolling_every: int | None = None  # resume checkpoints every k steps (None: off)
    keep_rolling: int = 2
    final: bool = True


@dataclass
class LoggingConfig:
    wandb: bool = True
    # None: the WANDB_MODE / WANDB_PROJECT environment variables, else offline (a real run folder
    # without network) and "testbed" (testbed/train/metrics.py)
    wandb_mode: str | None = None
    wandb_project: str | None = None
    progress: bool = True


@dataclass
class Config:
    name: str | None = None
    imports: list[str] = field(default_factory=list)  # modules that register ablation parts
    labels: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # One of the registered schedules (testbed/schedules.py), chosen by the section's `name`.
    schedule: Schedule = field(default_factory=lambda: split_section(None)[0]())
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        tree = dataclasses.asdict(self)
        tree["schedule"] = self.schedule.to_dict()  # asdict drops the name, which is no field
        return tree

    def to_yaml(self) -> str:
        """The resolved config as YAML that load_config reads back (RUN_DIR/config.yaml)."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- run ids


def section_classes(tree: dict[str, Any]) -> dict[str, type]:
    """Each section of a config tree -> the dataclass it is built into (the schedule's: the class
    its `name` registers, when registered)."""
    hints = typing.get_type_hints(Config)
    out = {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}
    section = tree.get("schedule")
    name = section.get("name", DEFAULT_SCHEDULE) if isinstance(section, dict) else DEFAULT_SCHEDULE
    if name in SCHEDULES:
        out["schedule"] = SCHEDULES.get(name)
    else:
        out.pop("schedule", None)
    return out


def config_hash(tree: dict[str, Any]) -> str:
    """A short hash of what a config computes (testbed.rundir.hash_tree): its name, labels,
    logging and the keys that change no number do not count, nor a field declared ADDED_LATER
    (in its section's dataclass, or its schedule's) while at its default, nor a part's option at
    its default (part_options_changed). The one hash of a config: sweeps name runs by it,
    standalone runs use it as id."""
    for key in PART_OPTIONS:
        section_name, field_name = key.split(".")
        section = tree.get(section_name)
        if isinstance(section, dict) and isinstance(section.get(field_name), dict) and section[field_name]:
            tree = {**tree, section_name: {**section, field_name: part_options_changed(section, key)}}
    return hash_tree(tree, section_classes(tree))


def part_options_changed(section: dict[str, Any], key: str) -> dict[str, Any]:
    """A part's options (`key`, e.g. model.norm_options, in its config `section`) less the values
    equal to the part's defaults, when the part is registered (a user's part is, in the process
    that built its config)."""
    section_name, name_key, registry_key = PART_OPTIONS[key]
    values = section[key.split(".")[1]]
    registry = registry_for(registry_key)
    section_class = {"model": ModelConfig, "optim": OptimConfig, "data": DataConfig}[section_name]
    name = section.get(name_key, getattr(section_class(), name_key))
    cls = registry.options_class(name) if registry is not None and isinstance(name, str) else None
    if cls is None:
        return dict(values)
    default = defaults(cls)
    return {k: v for k, v in values.items() if k not in default or default[k] != v}


def resolve_part_options(config: Config) -> None:
    """Check each part's options against the Options dataclass it registered (keys, types,
    `check`); the run id leaves out those at their defaults (config_hash). A part whose registry
    is not imported yet (a built-in, before torch is loaded) is checked when it is built."""
    for key, (section_name, name_key, registry_key) in PART_OPTIONS.items():
        registry = registry_for(registry_key)
        section = getattr(config, section_name)
        name = getattr(section, name_key)
        if registry is None or name not in registry:
            continue
        field_name = key.split(".")[1]
        given = getattr(section, field_name)
        options = registry.make_options(name, given, key, convert=build_dataclass)
        # As given (a sweep's labels read them), each converted to its field's type.
        setattr(section, field_name, {k: getattr(options, k) for k in given} if options is not None else {})


def run_id(tree: dict[str, Any]) -> str:
    """A run's id: its config's name (a sweep names each run), else the config's hash."""
    return tree.get("name") or config_hash(tree)


# ----------------------------------------------------------------------------- loading


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a YAML file")
    try:
        data = yaml.safe_load(decode_text(path.read_bytes(), path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: "
                          f"{getattr(err, 'problem', err)}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, "
                          f"not a {type(data).__name__}")
    return data


def decode_text(data: bytes, path: str | Path) -> str:
    """The UTF-8 text of a user's file (a byte-order mark dropped); any other encoding, or binary
    bytes, is one error naming the file and the fix."""
    why = None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        why = "it is UTF-16: it starts with a byte-order mark"
    elif b"\0" in data:
        why = "it holds NUL bytes: a binary file, or UTF-16 without a byte-order mark"
    else:
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            why = f"byte {err.start} is 0x{data[err.start]:02x}"
    raise ConfigError(f"{str(path)!r} is not UTF-8 text ({why}); save it as UTF-8")


def parse_override(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value, e.g. optim.lr=3e-3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: values in `top` win; mappings merge key by key."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_names(folder: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (folder or presets_dir()).glob("*.yaml"))


def model_preset(name: str) -> dict[str, Any]:
    folder = presets_dir()
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = preset_names(folder)
        if not known:
            raise ConfigError(f"model.preset={name!r}: no presets found in {str(folder)!r}; "
                              f"unset TESTBED_CONFIGS or point it at a folder holding "
                              f"models/<name>.yaml")
        near = difflib.get_close_matches(str(name), known, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(f"model.preset={name!r} is not a rung of the ladder; {hint}"
                          f"choose one of {', '.join(known)}")
    preset = read_yaml(path)
    return preset.get("model", preset)


def load_config(source: str | Path | dict[str, Any] | None = None,
                overrides: list[str] | dict[str, Any] | None = None,
                notes: list[str] | None = None) -> Config:
    """Build a validated Config from a YAML path (or a dict) plus dotted overrides. `notes`, when
    given, receives a line for each file value an override replaced beyond its own key (a preset
    on the command line replacing the file's shape)."""
    if source is None:
        tree: dict[str, Any] = {}
    elif isinstance(source, dict):
        tree = copy.deepcopy(source)  # overrides write into nested sections: never the caller's
    else:
        tree = read_yaml(source)
    pairs: list[Any] = list(overrides.items()) if isinstance(overrides, dict) else list(overrides or [])
    parsed = [item if isinstance(item, tuple) else parse_override(item) for item in pairs]
    duration = tuple(f"train.{k}" for k in DURATION_KEYS)
    given: set[str] = set()
    for key, value in parsed:
        if key in duration and isinstance(tree.get("train"), dict):
            # A run length given on the command line replaces the file's, whichever form it took
            # (two lengths on the command line are still an error).
            for other in duration:
                if other not in given:
                    tree["train"].pop(other.split(".")[1], None)
        if key == "model.preset" and value is not None and isinstance(tree.get("model"), dict):
            # The preset a user names on the command line is the model they ask for.
            note = replace_shape(tree["model"], value, {k for k, _ in parsed})
            if note and notes is not None:
                notes.append(note)
        given.add(key)
        set_dotted(tree, key, value)
    return from_dict(tree)


DURATION_KEYS = ("tokens", "steps", "tokens_per_param", "flops")
SHAPE_KEYS = ("d_model", "n_layers", "n_heads")
# What a preset named on the command line replaces in the file: the keys that decide the rung's
# size (max_seq_len and the rest stay the file's: they go with its data).
PRESET_REPLACES = (*SHAPE_KEYS, "depth")


def replace_shape(model: dict[str, Any], preset: Any, cli_keys: set[str]) -> str | None:
    """Drop the file's shape keys from `model` (in place) for a preset named on the command line,
    except those the command line itself gives; a note naming the values that change, or None."""
    rung = model_preset(str(preset))
    changed = []
    for key in PRESET_REPLACES:
        if f"model.{key}" in cli_keys or model.get(key) is None:
            continue
        old = model.pop(key)
        if key not in rung or rung[key] != old:
            changed.append(f"model.{key}={old!r}" + (f" -> {rung[key]!r}" if key in rung else ""))
    if not changed:
        return None
    return f"model.preset={preset} on the command line replaces the file's {', '.join(changed)}"


def depth_shape(depth: int, aspect: int, head_dim: int) -> dict[str, int]:
    """The depth dial's rule: d_model = aspect x depth, n_heads = d_model / head_dim."""
    d_model = aspect * depth
    return {"d_model": d_model, "n_layers": depth, "n_heads": max(1, d_model // head_dim)}


def apply_depth(model: dict[str, Any]) -> dict[str, Any]:
    """Fill d_model, n_layers and n_heads from model.depth. A shape key given beside it must
    agree with the rule (a saved config holds both), and a preset, which fixes the shape, cannot
    be combined with it."""
    depth = model.get("depth")
    if depth is None:
        return model
    defaults = ModelConfig()
    depth = coerce(int, depth, "model.depth")
    aspect = coerce(int, model.get("depth_aspect", defaults.depth_aspect), "model.depth_aspect")
    head_dim = coerce(int, model.get("depth_head_dim", defaults.depth_head_dim), "model.depth_head_dim")
    for key, value in (("model.depth", depth), ("model.depth_aspect", aspect),
                       ("model.depth_head_dim", head_dim)):
        _positive(key, value)
    require(model.get("preset") is None,
            f"model.depth={depth} and model.preset={model.get('preset')!r} both set; the depth dial "
            f"derives the shape itself, so drop one of them")
    require((aspect * depth) % head_dim == 0,
            f"model.depth={depth}: d_model = model.depth_aspect={aspect} x depth = {aspect * depth} "
            f"is not a multiple of model.depth_head_dim={head_dim}; make depth_aspect a multiple "
            f"of depth_head_dim")
    shape = depth_shape(depth, aspect, head_dim)
    for key in SHAPE_KEYS:
        if key in model and model[key] is not None and coerce(int, model[key], f"model.{key}") != shape[key]:
            raise ConfigError(f"model.{key}={model[key]!r} disagrees with model.depth={depth}, which "
                              f"sets {key}={shape[key]}; drop model.{key} (the depth dial derives it)")
    return {**model, **shape}


def import_plugins(modules: list[str] | Any) -> None:
    """Import the modules named in `imports`, so their registered parts (ablations, schedules)
    exist; before the rest of the config is built, since the schedule section names a class."""
    if not isinstance(modules, (list, tuple)):
        raise ConfigError(f"imports={modules!r} must be a list of module names, e.g. imports=[my_ablation]")
    import_modules(modules, "imports: module")


def from_dict(tree: dict[str, Any]) -> Config:
    tree = merge({}, tree)
    import_plugins(tree.get("imports") or [])
    model = tree.get("model")
    if isinstance(model, dict) and model.get("depth") is not None:
        tree["model"] = apply_depth(model)
    elif isinstance(model, dict) and model.get("preset"):
        tree["model"] = merge(model_preset(model["preset"]), model)
    config = build_dataclass(Config, tree, "")
    resolve_part_options(config)
    validate(config)
    return config


def build_dataclass(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys, "
                          f"got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"did you mean {prefix + near[0]!r}?" if near else f"valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix + str(key)!r} (value {value!r}); {hint}")
        kwargs[key] = coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def saved_config(tree: dict[str, Any]) -> Config:
    """A config as a run directory or checkpoint stored it. Runs written before schedules were
    separate dataclasses stored every schedule's fields in one section; the fields the named
    schedule does not take were never used by it, so they are dropped rather than refused."""
    tree = copy.deepcopy(tree)
    section = tree.get("schedule")
    if isinstance(section, dict):
        cls = schedule_class(section.get("name", DEFAULT_SCHEDULE))
        accepted = {f.name for f in dataclasses.fields(cls)} | {"name"}
        tree["schedule"] = {k: v for k, v in section.items() if k in accepted}
    return from_dict(tree)


# Integers become int64 in numpy and torch; no config needs a larger one.
MAX_INT = 2**63 - 1


def coerce(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against a type hint, converting where it is lossless (int -> float)."""
    if hint is Schedule:
        # The section's name picks the dataclass; only that schedule's fields are accepted.
        cls, values = split_section(value)
        return build_dataclass(cls, values, key + ".")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value if value is not None else {}, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, key)
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[1,2]")
        if args and dataclasses.is_dataclass(args[0]):  # a list of sections: name each by its index
            return [coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        return [coerce(args[0], v, key) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping of keys")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if hint is int:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)  # YAML reads 2e6 (no dot) as a string
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)) \
                or (isinstance(number, float) and not (math.isfinite(number) and number.is_integer())):
            raise ConfigError(f"{key}={value!r} must be a whole number")
        if abs(number) > MAX_INT:
            raise ConfigError(f"{key}={value!r} is too large; keep it within +-{MAX_INT:.3g}")
        return int(number)
    if hint is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)  # YAML reads 3e-3 (no dot) as a string
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return float(number)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    return value


# ----------------------------------------------------------------------------- validation

CHOICES = {
    "train.precision": ("auto", "fp32", "bf16"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
}


def check_choice(key: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(f"{key}={value!r} is not a valid choice; {hint}choose one of "
                          f"{', '.join(choices)}")


def check_source(d: DataConfig) -> None:
    """data.source names a registered source (the loader's registry, when a user's source or the
    loader itself has imported it; else one of the built-in names)."""
    registry = registry_for("data.source")
    if registry is not None:
        registry.get(source_name(d))  # the one error: key, value, near match, registered names
    elif source_name(d) not in BUILTIN_SOURCES:
        near = difflib.get_close_matches(str(d.source), BUILTIN_SOURCES, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(f"data.source={d.source!r} is not a registered data source; {hint}choose one of "
                          f"{', '.join(sorted(BUILTIN_SOURCES))}")


def require(condition: Any, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _positive(key: str, value: Any, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    require(value > 0, f"{key}={value!r} must be positive" + (" or null" if nullable else ""))


def _at_least(key: str, value: Any, low: int, why: str = "") -> None:
    require(value >= low, f"{key}={value!r} must be >= {low}{why}")


SEED_LIMIT = 2**32  # numpy and torch generators take seeds in [0, 2**32)


def validate(c: Config) -> None:
    """Every field against its range (types and finiteness were checked when it was built), then
    the rules that tie fields together. Each failure is one ConfigError naming key and value."""
    m, d, t, o = c.model, c.data, c.train, c.optim
    for key, value in (("model.d_model", m.d_model), ("model.n_layers", m.n_layers),
                       ("model.n_heads", m.n_heads), ("model.max_seq_len", m.max_seq_len),
                       ("model.ffn_ratio", m.ffn_ratio), ("model.ffn_multiple_of", m.ffn_multiple_of),
                       ("model.norm_eps", m.norm_eps), ("model.rope_theta", m.rope_theta),
                       ("model.init_std", m.init_std), ("model.depth_aspect", m.depth_aspect),
                       ("model.depth_head_dim", m.depth_head_dim),
                       ("data.seq_len", d.seq_len), ("train.global_batch_tokens", t.global_batch_tokens),
                       ("data.val_sequences", d.val_sequences), ("train.eval_every", t.eval_every),
                       ("train.log_every", t.log_every), ("optim.lr", o.lr), ("optim.eps", o.eps)):
        _positive(key, value)
    optional: tuple[tuple[str, float | None], ...] = (
                       ("model.n_kv_heads", m.n_kv_heads), ("model.vocab_size", m.vocab_size),
                       ("model.depth", m.depth),
                       ("data.unique_tokens", d.unique_tokens), ("train.micro_batch_size", t.micro_batch_size),
                       ("train.divergence_nats", t.divergence_nats), ("train.spike_nats", t.spike_nats),
                       ("checkpoint.every", c.checkpoint.every),
                       ("checkpoint.rolling_every", c.checkpoint.rolling_every))
    for key, maybe in optional:
        _positive(key, maybe, nullable=True)
    for key, seed in (("data.seed", d.seed), ("train.seed", t.seed)):
        require(0 <= seed < SEED_LIMIT, f"{key}={seed!r} must be in [0, 2**32)")
    if isinstance(c.schedule, Schedule):
        c.schedule.check_fields()
    require(m.d_model % m.n_heads == 0,
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
            f"choose n_heads among {[h for h in range(1, 65) if m.d_model % h == 0]}")
    require(m.head_dim % 2 == 0, f"model.d_model/n_heads={m.head_dim} must be even for rotary positions")
    require(m.n_heads % m.kv_heads == 0,
            f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    require(d.seq_len <= m.max_seq_len,
            f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
            f"lower data.seq_len or raise model.max_seq_len")
    require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    check_choice("model.parametrization", m.parametrization, ("sp", "mup"))
    _positive("model.mup_base_width", m.mup_base_width, nullable=True)
    _positive("model.mup_base_head_dim", m.mup_base_head_dim, nullable=True)
    require(m.parametrization != "mup" or m.mup_base_width is not None,
            f"model.parametrization='mup' needs model.mup_base_width (the d_model the hyperparameters "
            f"were tuned at), e.g. model.mup_base_width={m.d_model}")
    check_source(d)
    require(d.source != "mixture" or not d.path, f"data.path={d.path!r} with data.source='mixture': a mixture reads "
            "its folders from data.source_options.sources; remove data.path")
    require(d.source != "random" or m.vocab_size, "data.source='random' needs model.vocab_size")
    require(d.source != "shards" or d.path, "data.source='shards' needs data.path=FOLDER "
            "(a folder written by `testbed data prepare`)")
    check_choice("train.precision", t.precision, CHOICES["train.precision"])
    check_choice("train.parallel", t.parallel, ("ddp", "fsdp"))
    _positive("train.collective_timeout_s", t.collective_timeout_s)
    if t.cuda_graphs:  # the graphs capture the compiled forward and backward, whole
        require(t.compile is not False, "train.cuda_graphs=true captures the compiled step, but train.compile=false; "
                "remove one of them")
        require(not t.activation_checkpointing, "train.cuda_graphs=true with train.activation_checkpointing=true: "
                "graphs are for small models, checkpointing for large ones; turn one off")
    if c.logging.wandb_mode is not None:
        check_choice("logging.wandb_mode", c.logging.wandb_mode, CHOICES["logging.wandb_mode"])
    given = [k for k in DURATION_KEYS if getattr(t, k) is not None]
    require(len(given) <= 1, f"train.{given[0]} and train.{given[1]} both set; give only one "
            f"of train.tokens, train.steps, train.tokens_per_param, train.flops" if len(given) > 1 else "")
    for key in given:
        require(getattr(t, key) > 0, f"train.{key}={getattr(t, key)!r} must be positive")
    require(t.global_batch_tokens % d.seq_len == 0,
            f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of "
            f"data.seq_len={d.seq_len}; use {max(1, round(t.global_batch_tokens / d.seq_len)) * d.seq_len}")
    require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
            f"optim.betas={o.betas} must be two numbers in [0, 1)")
    require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    require(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)")
    require(o.z_loss >= 0, f"optim.z_loss={o.z_loss} must be >= 0 (0 disables the z-loss; PaLM used 1e-4)")
    if d.unique_tokens is not None:
        require(d.unique_tokens >= t.global_batch_tokens,
                f"data.unique_tokens={d.unique_tokens} is smaller than one batch "
                f"(train.global_batch_tokens={t.global_batch_tokens}); raise it or shrink the batch")
    if t.ema_decay is not None:
        require(0.0 <= t.ema_decay < 1.0, f"train.ema_decay={t.ema_decay!r} must be in [0, 1) (e.g. 0.999), "
                                          f"or null (or 0) to keep no moving average of the weights")
    validate_tasks(t.tasks)
    ck = c.checkpoint
    _at_least("checkpoint.keep_rolling", ck.keep_rolling, 1)
    _at_least("checkpoint.log_spaced", ck.log_spaced, 0)
    require(all(tokens > 0 for tokens in ck.at_tokens),
            f"checkpoint.at_tokens={ck.at_tokens!r} must hold positive token counts")


TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def validate_tasks(tasks: list[TaskConfig]) -> None:
    """Each task's fields; the files themselves are read (and checked line by line) when a run
    builds its data (testbed/data/tasks.py)."""
    seen: set[str] = set()
    for i, task in enumerate(tasks):
        key = f"train.tasks[{i}]"
        require(TASK_NAME.fullmatch(task.name),
                f"{key}.name={task.name!r} must be a non-empty name of letters, digits, '_', '.' or '-' "
                f"(it names the metrics task/<name>/...)")
        require(task.name not in seen, f"{key}.name={task.name!r} is used by two tasks; give each its own name")
        seen.add(task.name)
        require(task.path, f"{key}.path is empty; give a JSONL file or hub:DATASET")
        check_choice(f"{key}.kind", task.kind, TASK_KINDS)
        _positive(f"{key}.limit", task.limit, nullable=True)
