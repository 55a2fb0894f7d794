"""A small, safe arithmetic evaluator for a sweep's `derived:` fields.

Expressions such as `20 * n_params` or `0.003 * (n_params / 1e6) ** -0.2` are parsed with `ast`
and walked node by node: only numbers, names, dotted config keys (`model.d_model`, looked up in
the run's config mapping, never as Python attributes), + - * / // % **, unary minus and a
fixed set of functions are allowed. Nothing is ever handed to `eval`.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

from testbed.errors import ConfigError

FUNCTIONS: dict[str, Callable[..., Any]] = {
    "min": min,
    "max": max,
    "round": round,
    "abs": abs,
    "log": math.log,
    "log2": math.log2,
    "log10": math.log10,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "floor": math.floor,
    "ceil": math.ceil,
}

BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}

# Keeps `10 ** 10 ** 10` from eating the machine: no sweep needs larger exponents.
MAX_EXPONENT = 1000
# Every intermediate result stays within this magnitude (a power is checked through logarithms
# before it is computed), so `((10**1000)**1000)**1000` is refused at once instead of hanging.
MAX_MAGNITUDE = 1e30


def evaluate(text: str, names: Mapping[str, Any], key: str = "expression") -> Any:
    """Evaluate `text` with `names` (short names and nested config mappings) in scope."""
    try:
        tree = ast.parse(str(text), mode="eval")
    except SyntaxError:
        raise ConfigError(f"derived {key}={text!r} is not a valid expression; write arithmetic "
                          f"such as '20 * n_params'") from None
    try:
        return _bounded(_walk(tree.body, names, text, key), text, key)
    except (ZeroDivisionError, OverflowError, ValueError, TypeError) as err:
        raise ConfigError(f"derived {key}={text!r} cannot be computed ({err}); "
                          f"check the expression and the quantities it uses") from None


def _walk(node: ast.AST, names: Mapping[str, Any], text: str, key: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
            and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        if node.id in FUNCTIONS:
            raise ConfigError(f"derived {key}={text!r} uses {node.id!r} without calling it; "
                              f"write {node.id}(...)")
        raise ConfigError(f"derived {key}={text!r} uses unknown name {node.id!r}; "
                          f"known names: {', '.join(sorted(k for k in names if '.' not in k))}")
    if isinstance(node, ast.Attribute):
        # `model.d_model` is a dotted config key, resolved in the config mapping only.
        parent = _walk(node.value, names, text, key)
        if isinstance(parent, Mapping) and node.attr in parent:
            return parent[node.attr]
        raise ConfigError(f"derived {key}={text!r}: config key {ast.unparse(node)!r} does not "
                          f"exist; use a key of the resolved config")
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left = _number(_walk(node.left, names, text, key), node.left, text, key)
        right = _number(_walk(node.right, names, text, key), node.right, text, key)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise ConfigError(f"derived {key}={text!r} raises to the power {right}; "
                                  f"keep exponents within +-{MAX_EXPONENT}")
            if left != 0 and right * math.log10(abs(left)) > math.log10(MAX_MAGNITUDE):
                raise ConfigError(f"derived {key}={text!r}: {ast.unparse(node)!r} would exceed "
                                  f"{MAX_MAGNITUDE:g} in magnitude; keep every value of a derived "
                                  f"field within +-{MAX_MAGNITUDE:g}")
        return _bounded(BINARY[type(node.op)](left, right), text, key, node)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _number(_walk(node.operand, names, text, key), node.operand, text, key)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and node.func.id in FUNCTIONS and not node.keywords:
        args = [_number(_walk(a, names, text, key), a, text, key) for a in node.args]
        return _bounded(FUNCTIONS[node.func.id](*args), text, key, node)
    raise ConfigError(f"derived {key}={text!r} uses {ast.unparse(node)!r}, which is not allowed; "
                      f"use numbers, names, + - * / ** and {', '.join(FUNCTIONS)}")


def _number(value: Any, node: ast.AST, text: str, key: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"derived {key}={text!r}: {ast.unparse(node)!r} is {value!r}, "
                          f"not a number")
    return _bounded(value, text, key, node)


def _bounded(value: Any, text: str, key: str, node: ast.AST | None = None) -> Any:
    """`value` when it is a real number within +-MAX_MAGNITUDE (or not a number at all, which
    the caller judges); else one error naming the part of the expression that gave it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, complex)):
        return value
    where = f"{ast.unparse(node)!r} gives" if node is not None else "gives"
    if isinstance(value, complex):
        raise ConfigError(f"derived {key}={text!r}: {where} a complex number; "
                          f"keep the base of a fractional power positive")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"derived {key}={text!r}: {where} {value}; check the expression")
    if abs(value) > MAX_MAGNITUDE:
        shown = f"{value:.3g}" if isinstance(value, float) else f"about 1e{len(str(abs(value))) - 1}"
        raise ConfigError(f"derived {key}={text!r}: {where} {shown}, beyond +-{MAX_MAGNITUDE:g}; "
                          f"keep every value of a derived field within that magnitude")
    return value


# ----------------------------------------------------------------------------- axis helpers


def simplex(names: list[str], step: float) -> list[dict[str, float]]:
    """Every weight dict over `names` on the grid of multiples of `step` summing to 1 (a
    mixture's data.source_options.weights), the first name's weight descending: e.g.
    simplex([a, b], 0.5) = [{a: 1, b: 0}, {a: 0.5, b: 0.5}, {a: 0, b: 1}]."""
    n = round(1 / step) if step > 0 else 0
    if n < 1 or abs(n * step - 1) > 1e-9 or n > 1000:
        raise ConfigError(f"simplex step={step!r} must divide 1 into at most 1000 parts, e.g. step=0.25")
    out: list[dict[str, float]] = []

    def fill(prefix: list[int], left: int) -> None:
        if len(prefix) == len(names) - 1:
            out.append({name: round(k / n, 12) for name, k in zip(names, [*prefix, left])})
            return
        for k in range(left, -1, -1):
            fill([*prefix, k], left - k)

    fill([], n)
    return out


def axis_values(text: str, key: str) -> list[Any]:
    """An axis given as a helper call instead of a list: `simplex(names=[a, b, c], step=0.25)`
    (names are bare words or strings) -> its list of values."""
    usage = f"write {key}: 'simplex(names=[a, b, c], step=0.25)' or a list of values"
    try:
        call = ast.parse(str(text), mode="eval").body
    except SyntaxError:
        raise ConfigError(f"axis {key}={text!r} is not a valid helper call; {usage}") from None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "simplex"
            and not call.args and {k.arg for k in call.keywords} == {"names", "step"}):
        raise ConfigError(f"axis {key}={text!r} is neither a list nor a known helper; {usage}")
    given = {k.arg: k.value for k in call.keywords}
    names_node, step_node = given["names"], given["step"]
    names: list[str] = []
    for e in getattr(names_node, "elts", []):
        if isinstance(e, ast.Name):
            names.append(e.id)
        elif isinstance(e, ast.Constant) and isinstance(e.value, str):
            names.append(e.value)
    if not isinstance(names_node, ast.List) or len(names) != len(names_node.elts) or len(set(names)) < 2 \
            or len(set(names)) != len(names):
        raise ConfigError(f"axis {key}={text!r}: names must list two or more different names; {usage}")
    if not (isinstance(step_node, ast.Constant) and isinstance(step_node.value, (int, float))
            and not isinstance(step_node.value, bool)):
        raise ConfigError(f"axis {key}={text!r}: step must be a number; {usage}")
    return list(simplex(names, float(step_node.value)))
