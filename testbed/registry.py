"""Named registries: the extension points for ablations.

An ablation is one registered function or class plus a config value naming it, e.g.

    from testbed.model.transformer import NORMS

    @NORMS.register("layernorm_nobias")
    def layernorm_nobias(dim, eps): ...

and then `model.norm=layernorm_nobias` in a config or a sweep axis. No trainer edits needed.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from testbed.errors import ConfigError


def _definition(obj: Any) -> tuple[Any, Any]:
    return getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)


class Registry:
    """Name -> object. `origin(obj)` says where an object is defined (default: its module and
    qualified name), so that a module imported again may re-register its own definitions.
    `check(name, obj)`, when given, raises ConfigError for an object that cannot be registered
    (the schedules': one that does not declare its phases)."""

    def __init__(self, kind: str, config_key: str, origin: Callable[[Any], Any] = _definition,
                 check: Callable[[str, Any], None] | None = None):
        self.kind = kind
        self.config_key = config_key
        self._origin = origin
        self._check = check
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def add(obj: Any) -> Any:
            old = self._items.get(name)
            # The same definition registering again (its module re-imported) replaces itself;
            # a different one under a taken name is a mistake.
            # A user's plugin can cause this, so it is a ConfigError (one line, no traceback).
            if old is not None and old is not obj and self._origin(old) != self._origin(obj):
                raise ConfigError(f"{self.kind} {name!r} is already registered by {self._origin(old)}; "
                                  f"register {self._origin(obj)} under another name")
            if self._check is not None:
                self._check(name, obj)
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

    def items(self) -> list[tuple[str, Any]]:
        """(name, object) pairs in registration order."""
        return list(self._items.items())

    def name_of(self, obj: Any) -> str | None:
        """The name `obj` is registered under (None when it is not)."""
        return next((name for name, item in self._items.items() if item is obj), None)

    def __contains__(self, name: object) -> bool:
        return name in self._items


def import_modules(names: list[str] | tuple[str, ...], source: str) -> None:
    """Import user modules so that what they register exists: `imports:` in a config, `--import`
    on the command line (`source` names which, for the error)."""
    import importlib

    for name in names:
        try:
            importlib.import_module(str(name))
        except ImportError as err:
            raise ConfigError(f"{source} {name!r} cannot be imported ({err}); put the module on PYTHONPATH "
                              f"or fix its dotted name") from None
