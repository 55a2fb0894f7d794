"""Named registries: the extension points for ablations.

An ablation is one registered function or class plus a config value naming it, e.g.

    from testbed.model.transformer import NORMS

    @NORMS.register("layernorm_nobias")
    def layernorm_nobias(dim, eps): ...

and then `model.norm=layernorm_nobias` in a config or a sweep axis. No trainer edits needed.

A part may own settings, as a schedule owns its fields: a frozen dataclass subclassing `Options`
given at registration (`NORMS.register("dyt", options=DyTOptions)`). The part is then built with
one more keyword argument, `options=`, the validated dataclass; a config reaches its fields under
the part's options key (`model.norm_options.alpha=0.5`, testbed.config.PART_OPTIONS), each field
checked where it is declared (`Options.check`) and counted in the run id only when it differs
from its default. A part without options is built exactly as before.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any

from testbed.errors import ConfigError


def _definition(obj: Any) -> tuple[Any, Any]:
    return getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)


class FieldError(Exception):
    """Raised by `Options.require` inside `check`: `Options.validate` turns it into one ConfigError
    naming the config key of the field, its value and the fix."""

    def __init__(self, field: str, fix: str):
        super().__init__(field, fix)
        self.field, self.fix = field, fix


@dataclasses.dataclass(frozen=True)
class Options:
    """The settings a registered part owns: subclass it as a frozen dataclass whose fields have
    defaults, and override `check` to hold each field to its range with `require`:

        @dataclass(frozen=True)
        class DyTOptions(Options):
            alpha: float = 0.5

            def check(self):
                self.require(self.alpha > 0, "alpha", "set it to a positive number, e.g. 0.5")
    """

    def check(self) -> None:
        """Hold each field to its range (types are already checked); call `require`."""

    def require(self, condition: Any, field: str, fix: str) -> None:
        if not condition:
            raise FieldError(field, fix)

    def validate(self, key: str) -> None:
        """`check`, its failure as one ConfigError naming `key`.FIELD, its value and the fix."""
        try:
            self.check()
        except FieldError as err:
            raise ConfigError(f"{key}.{err.field} is {getattr(self, err.field, None)!r}; {err.fix}") from None


def defaults(cls: type) -> dict[str, Any]:
    """An options dataclass's field -> default."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def check_options_class(kind: str, name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Options) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"{kind} {name!r}: options={cls!r} is not an Options dataclass; register a "
                          f"frozen dataclass subclassing testbed.registry.Options")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{kind} {name!r}: option {missing[0]!r} of {cls.__qualname__} has no default; "
                          f"give every option a default (the part's behaviour when the config sets none)")


# The first registry made for each config key (registry_for).
_BY_KEY: dict[str, Registry] = {}


def registry_for(config_key: str) -> Registry | None:
    """The registry whose names a config key takes (e.g. model.norm), once its module is imported."""
    return _BY_KEY.get(config_key)


def registries() -> list[Registry]:
    """Every registry made so far (the first for each config key), in the order made: those of
    the modules imported (`testbed parts` imports the built-in ones)."""
    return list(_BY_KEY.values())


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
        self._options: dict[str, type[Options]] = {}
        _BY_KEY.setdefault(config_key, self)

    def register(self, name: str, options: type[Options] | None = None) -> Callable[[Any], Any]:
        """Register under `name`; `options`, an `Options` dataclass, declares the part's own
        settings (it is then built with `options=` an instance of it)."""
        if options is not None:
            check_options_class(self.kind, name, options)

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
            if options is None:
                self._options.pop(name, None)
            else:
                self._options[name] = options
            return obj

        return add

    def options_class(self, name: str) -> type[Options] | None:
        """The `Options` dataclass the part `name` declared (None: it owns no settings)."""
        return self._options.get(name)

    def make_options(self, name: str, values: Mapping[str, Any] | None, key: str,
                     convert: Callable[[type, dict[str, Any], str], Any] | None = None) -> Options | None:
        """The part's options from a config mapping (`key`: where the config gives it, e.g.
        model.norm_options), each key checked to be one of its fields and each field validated;
        None for a part without options, which then must be given none. `convert(cls, values,
        prefix)` builds the dataclass (the config's, which checks and converts each type)."""
        values = dict(values or {})
        cls = self.options_class(name)
        if cls is None:
            if values:
                raise ConfigError(f"{key}.{next(iter(values))} is {next(iter(values.values()))!r} but "
                                  f"{self.kind} {name!r} has no settings; remove {key} or choose a "
                                  f"{self.kind} that takes them ({self.config_key})")
            return None
        accepted = [f.name for f in dataclasses.fields(cls)]
        for k, v in values.items():
            if k not in accepted:
                near = difflib.get_close_matches(str(k), accepted, n=1, cutoff=0.5)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise ConfigError(f"{key}.{k} is {v!r} but {self.kind} {name!r} has no {k}; {hint}"
                                  f"it takes {', '.join(accepted)}")
        options = convert(cls, values, key + ".") if convert is not None else cls(**values)
        options.validate(key)
        return options

    def build(self, name: str, *args: Any, options: Mapping[str, Any] | None = None, key: str = "",
              name_key: str | None = None) -> Any:
        """The part `name` called with `args`, plus `options=` its validated Options when it
        declares some (`key`: the config key of those, `name_key`: of the name, for errors)."""
        factory = self.get(name, name_key)
        made = self.make_options(name, options, key or f"{self.config_key}_options")
        return factory(*args) if made is None else factory(*args, options=made)

    def listing(self) -> list[str]:
        """One line per registered name with its settings and their defaults, e.g.
        ``dyt (alpha=0.5)``: the part listing (docs/ablations.md)."""
        lines = []
        for name in self.names():
            cls = self.options_class(name)
            fields = ", ".join(f"{k}={v!r}" for k, v in defaults(cls).items()) if cls else ""
            lines.append(f"{name} ({fields})" if fields else name)
        return lines

    def get(self, name: str, key: str | None = None) -> Any:
        """The object registered as `name` (`key`: the config key that named it, when not this
        registry's own, e.g. model.qk_norm_type for a norm)."""
        if name not in self._items:
            near = difflib.get_close_matches(str(name), list(self._items), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"{key or self.config_key}={name!r} is not a registered {self.kind}; {hint}"
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
