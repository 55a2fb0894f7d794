"""Row selection as a small language, for `--where` and `--holdout`.

    rule    := or_expr
    or_expr := and_expr ('or' and_expr)*
    and_expr:= atom ('and' atom)*
    atom    := '(' rule ')' | 'not' atom | COLUMN OP VALUE | COLUMN ['not'] 'in' '[' VALUE (',' VALUE)* ']'
    OP      := > < >= <= == != (= is ==)
    VALUE   := a number (1e8, 2.5), a quoted string ('pre', "post") or a bare word (pre)

Numbers compare numerically with numeric columns; strings compare with the column as text.
A string value that matches no row is an error naming the values the column holds, since it
is almost always a typo. Several rules (repeated `--where`) combine with `and`.
"""

from __future__ import annotations

import difflib
import re

import numpy as np
import pandas as pd

from testbed.errors import TestbedError

_TOKEN = re.compile(r"""\s*(?:
    (?P<str>'[^']*'|"[^"]*")
  | (?P<op>>=|<=|==|!=|>|<|=)
  | (?P<punct>[()\[\],])
  | (?P<word>[^\s()\[\],<>=!'"]+)
)""", re.X)
_OPS = {">": np.greater, "<": np.less, ">=": np.greater_equal, "<=": np.less_equal,
        "==": np.equal, "!=": np.not_equal, "=": np.equal}
EXAMPLE = "write e.g. 'N>1e8', \"label_norm=='pre' and C>=1e17\" or 'label_lr in [1e-3, 3e-3]'"


def _tokens(rule: str, option: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    rule = rule.rstrip()
    while pos < len(rule):
        m = _TOKEN.match(rule, pos)
        if not m or m.end() == pos:
            raise TestbedError(f"{option} {rule!r}: cannot read {rule[pos:]!r}; {EXAMPLE}.")
        kind = m.lastgroup or "word"
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, frame: pd.DataFrame, rule: str, option: str):
        self.frame, self.rule, self.option = frame, rule, option
        self.tokens = _tokens(rule, option)
        self.i = 0
        self.columns: list[str] = []

    def fail(self, why: str):
        raise TestbedError(f"{self.option} {self.rule!r} is not understood: {why}; {EXAMPLE}.")

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            self.fail("it ends too early")
        self.i += 1
        return token  # type: ignore[return-value]

    def keyword(self, word: str) -> bool:
        token = self.peek()
        if token is not None and token[0] == "word" and token[1].lower() == word:
            self.i += 1
            return True
        return False

    def parse(self) -> np.ndarray:
        if not self.tokens:
            self.fail("it is empty")
        mask = self.or_expr()
        if self.peek() is not None:
            self.fail(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return mask

    def or_expr(self) -> np.ndarray:
        mask = self.and_expr()
        while self.keyword("or"):
            mask = mask | self.and_expr()
        return mask

    def and_expr(self) -> np.ndarray:
        mask = self.atom()
        while self.keyword("and"):
            mask = mask & self.atom()
        return mask

    def atom(self) -> np.ndarray:
        if self.keyword("not"):
            return ~self.atom()
        kind, text = self.take()
        if (kind, text) == ("punct", "("):
            mask = self.or_expr()
            if self.take() != ("punct", ")"):
                self.fail("a '(' is not closed")
            return mask
        if kind != "word":
            self.fail(f"expected a column name, found {text!r}")
        column = self.column(text)
        negate = self.keyword("not")
        if self.keyword("in"):
            return self.membership(column) ^ negate
        if negate:
            self.fail("'not' after a column must be followed by 'in'")
        kind, op = self.take()
        if kind != "op":
            self.fail(f"expected a comparison (>, <, >=, <=, ==, !=) after {column!r}, found {op!r}")
        return self.compare(column, op, self.value())

    def column(self, name: str) -> str:
        if name not in self.frame.columns:
            near = difflib.get_close_matches(name, list(map(str, self.frame.columns)), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise TestbedError(f"{self.option} {self.rule!r} names column {name!r}, which the table lacks; {hint}"
                               f"use one of {', '.join(map(str, self.frame.columns))}.")
        self.columns.append(name)
        return name

    def value(self) -> tuple[str, float | str]:
        kind, text = self.take()
        if kind == "str":
            return "str", text[1:-1]
        if kind != "word":
            self.fail(f"expected a value, found {text!r}")
        try:
            return "num", float(text)
        except ValueError:
            return "str", text

    def membership(self, column: str) -> np.ndarray:
        if self.take() != ("punct", "["):
            self.fail("'in' must be followed by a list such as [1, 2]")
        mask = np.zeros(len(self.frame), dtype=bool)
        while True:
            mask |= self.compare(column, "==", self.value())
            kind, text = self.take()
            if text == "]":
                return mask
            if text != ",":
                self.fail(f"expected ',' or ']' in the list, found {text!r}")

    def compare(self, column: str, op: str, value: tuple[str, float | str]) -> np.ndarray:
        kind, v = value
        series = self.frame[column]
        numeric = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
        if kind == "num" and not np.isnan(numeric).all():
            return np.asarray(_OPS[op](numeric, v), dtype=bool)
        text = series.astype(str).to_numpy()
        if kind == "num":  # a number against a text column: compare as written
            v = str(value[1]) if not float(v).is_integer() else str(int(v))
        if op in ("==", "=", "!=") and not (text == v).any():
            known = sorted(set(text))
            near = difflib.get_close_matches(str(v), known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            shown = ", ".join(repr(k) for k in known[:12]) + (", ..." if len(known) > 12 else "")
            raise TestbedError(f"{self.option} {self.rule!r}: no row has {column} == {v!r}; {hint}"
                               f"the column holds {shown}.")
        return np.asarray(_OPS[op](text, v), dtype=bool)


def rule_mask(frame: pd.DataFrame, rule: str, option: str = "--where") -> np.ndarray:
    """Rows matching `rule` (see the module docstring)."""
    return _Parser(frame, rule, option).parse()


def rule_columns(frame: pd.DataFrame, rule: str, option: str = "--holdout") -> list[str]:
    """The columns a rule reads, in order."""
    parser = _Parser(frame, rule, option)
    parser.parse()
    return parser.columns
