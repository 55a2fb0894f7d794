"""The registered parts and their settings, as the command line shows them: `testbed parts`
lists every registry imported so far (the command imports the built-in ones and `--import`
modules first), each name with its settings, their defaults and the config key that sets them;
`testbed train --dry-run` adds one line per chosen part that owns settings, each resolved
(docs/ablations.md). Imports no torch: it lists what the caller has imported."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from testbed.config import PART_OPTIONS
from testbed.registry import Options, Registry, defaults, registries, registry_for

# The parts a config chooses, in this order; any other registry follows.
PART_KEYS = ("model.norm", "model.norm_placement", "model.attention", "model.mlp", "model.position",
             "model.init", "optim.name", "schedule.name", "data.source")


def show(value: Any) -> str:
    """A value as a config override writes it (null, true, 0.5, [0.9, 0.95], 1-sqrt)."""
    if value is None or isinstance(value, (bool, list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def options_keys(registry: Registry) -> list[tuple[str, str]]:
    """(key naming a part, key of its settings) for each config key taking this registry's
    names, e.g. (model.norm, model.norm_options) and (model.qk_norm_type, model.qk_norm_options)."""
    return [(f"{section}.{name_key}", key) for key, (section, name_key, registry_key) in PART_OPTIONS.items()
            if registry_key == registry.config_key]


def settings(registry: Registry, name: str) -> dict[str, Any]:
    """The part's settings as config key -> default: its Options fields under its options key
    (model.norm_options.alpha), or, for a registry of dataclasses named by a section's `name`
    (the schedules), the class's own fields in that section (schedule.warmup_steps)."""
    cls = registry.options_class(name)
    if cls is not None:
        keys = options_keys(registry)
        prefix = keys[0][1] if keys else f"{registry.config_key}_options"  # Registry.build's default key
        return {f"{prefix}.{k}": v for k, v in defaults(cls).items()}
    obj = registry.get(name)
    section, _, last = registry.config_key.rpartition(".")
    if (last == "name" and section and isinstance(obj, type) and dataclasses.is_dataclass(obj)
            and not issubclass(obj, Options)):
        return {f"{section}.{k}": v for k, v in defaults(obj).items()}
    return {}


def registry_lines(registry: Registry) -> list[str]:
    """A registry's heading (the config keys naming its parts) and one line per name with its
    settings; settings every name shares with the same default are given once, in the heading."""
    names = registry.names()
    found = {name: settings(registry, name) for name in names}
    shared: dict[str, Any] = {}
    if len(names) > 1 and all(found.values()):
        first = found[names[0]]
        shared = {k: v for k, v in first.items() if all(k in s and s[k] == v for s in found.values())}
    keys = options_keys(registry)
    naming = ", ".join(k for k, _ in keys) if keys else registry.config_key
    head = f"{naming} ({registry.kind}"
    if len(keys) > 1:
        head += "; settings under " + ", ".join(k for _, k in keys)
    if shared:
        head += f"; every {registry.kind}: " + ", ".join(f"{k}={show(v)}" for k, v in shared.items())
    lines = [head + ")"]
    width = max((len(n) for n in names), default=0)
    for name in names:
        own = " ".join(f"{k}={show(v)}" for k, v in found[name].items() if k not in shared)
        lines.append(f"  {name.ljust(width)}  {own}".rstrip())
    if not names:
        lines.append("  (none registered)")
    return lines


def parts_listing() -> list[str]:
    """`testbed parts`: every registry imported, the parts a config chooses first."""
    order = {key: i for i, key in enumerate(PART_KEYS)}
    found = sorted(registries(), key=lambda r: order.get(r.config_key, len(order)))
    lines: list[str] = []
    for registry in found:
        lines += registry_lines(registry)
    lines.append("Set a part by its key (model.norm=NAME), a setting by the key shown (model.norm_options.FIELD=VALUE); "
                 "`testbed train CONFIG --dry-run` shows the chosen parts' settings.")
    return lines


def chosen_lines(config: Any) -> list[str]:
    """The `--dry-run` lines: each part the config chooses that owns settings, with every setting
    resolved and marked [set] (given in the config) or [default]. Only a registry already imported
    is asked (a user's part's always is); a built-in one is not (it would import torch), so a
    built-in part shows only the settings the config gives."""
    out = []
    for key, (section_name, name_key, registry_key) in PART_OPTIONS.items():
        section = getattr(config, section_name)
        name = getattr(section, name_key)
        given = dict(getattr(section, key.split(".")[1]) or {})
        if key == "model.qk_norm_options" and not (config.model.qk_norm or given):
            continue  # no QK-norm: its norm is not built
        registry = registry_for(registry_key)
        cls = registry.options_class(name) if registry is not None and name in registry else None
        if cls is None and not given:
            continue
        values = {k: (given.get(k, v), "set" if k in given else "default")
                  for k, v in (defaults(cls) if cls is not None else given).items()}
        tail = "" if cls is not None else "; checked when the part is built, defaults in `testbed parts`"
        shown = ", ".join(f"{k}={show(v)} [{how}]" for k, (v, how) in values.items())
        out.append(f"{section_name}.{name_key} = {name}  ({key}: {shown}{tail})")
    return out
