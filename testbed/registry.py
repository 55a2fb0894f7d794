"""Named registries: the extension points for ablations.

An ablation is one registered function or class plus a config value naming it, e.g.

    from testbed.model.transformer import NORMS

    @NORMS.register("layernorm_nobias")
    def layernorm_nobias(dim, eps): ...

and then `model.norm=layernorm_nobias` in a config or a sweep axis. No trainer edits needed.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

from testbed.errors import ConfigError


class Registry:
    def __init__(self, kind: str, config_key: str):
        self.kind = kind
        self.config_key = config_key
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def add(obj: Any) -> Any:
            old = self._items.get(name)
            # The same definition registering again (its module re-imported) replaces itself;
            # a different one under a taken name is a mistake.
            if old is not None and (getattr(old, "__module__", None), getattr(old, "__qualname__", None)) != (
                    getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)):
                raise ValueError(f"{self.kind} {name!r} is already registered by {old!r}")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> Any:
        if name not in self._items:
            near = difflib.get_close_matches(str(name), list(self._items), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"{self.config_key}={name!r} is not a registered {self.kind}; {hint}"
                              f"choose one of {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
