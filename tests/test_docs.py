"""The docs and the CLI help name only what exists: config keys, presets, commands, flags, files."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from testbed.cli import build_parser
from testbed.config import Config, preset_names
from testbed.schedules import SCHEDULES

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# `model.safetensors` and `train.log` are files, not config keys.
FILE_SUFFIXES = {"safetensors", "log", "json", "jsonl", "yaml", "csv", "png", "py", "md", "txt",
                 "sbatch", "lock"}


def sections() -> dict[str, set[str]]:
    hints = typing.get_type_hints(Config)
    known = {f.name: {x.name for x in dataclasses.fields(hints[f.name])}
             for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}
    # The schedule section is whichever registered schedule its `name` picks.
    known["schedule"] = {"name"}.union(*({x.name for x in dataclasses.fields(cls)}
                                         for _, cls in SCHEDULES.items()))
    return known


def inline_code(text: str) -> list[str]:
    """Backticked spans outside fenced blocks (those hold deliberate mistakes, e.g. the
    misspelt key of the error example in docs/config.md)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def test_pages_are_found():
    assert len(PAGES) > 5 and all(p.is_file() for p in PAGES)


def test_every_dotted_config_key_in_the_docs_exists():
    known = sections()
    key = re.compile(r"(?<![\w./$-])(" + "|".join(known) + r")\.([a-z_]+)\b(?![\w/(-])")
    bad, seen = [], 0
    for page in PAGES:
        for code in inline_code(page.read_text()):
            for section, name in key.findall(code):
                if name in FILE_SUFFIXES:
                    continue
                seen += 1
                if name not in known[section]:
                    bad.append(f"{page.name}: `{code}` ({section}.{name})")
    assert seen > 20  # the pattern still finds the keys the pages name
    assert not bad, "config keys that do not exist:\n" + "\n".join(bad)


def test_config_table_lists_exactly_the_fields():
    """docs/config.md's section table: each row's keys are the section's fields, all of them."""
    known = sections()
    rows = {}
    for line in (REPO / "docs" / "config.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and re.fullmatch(r"`(\w+)`", cells[0]) and cells[0][1:-1] in known:
            rows[cells[0][1:-1]] = set(re.findall(r"`([a-z_]+)`", cells[1]))
    assert set(rows) == set(known)
    for section, names in rows.items():
        assert names <= known[section], f"docs/config.md `{section}`: no such keys {names - known[section]}"
        if section != "schedule":  # that row ends in "..." and points at docs/schedules.md
            assert known[section] <= names, f"docs/config.md `{section}` omits {known[section] - names}"


def help_texts(parser: argparse.ArgumentParser) -> list[str]:
    texts = [parser.description or "", parser.epilog or ""]
    for action in parser._actions:
        texts.append(action.help or "")
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                texts += help_texts(sub)
    return texts


def test_presets_named_in_help_and_docs_exist():
    import testbed.config

    rungs = set(preset_names())
    assert {"100k", "1m", "1b"} <= rungs
    texts = help_texts(build_parser()) + [testbed.config.__doc__ or ""]
    texts += [p.read_text() for p in PAGES]
    named = [m for t in texts for m in re.findall(r"model\.preset=([\w.-]+)", t)]
    assert named  # the README and the train help show one
    assert set(named) <= rungs, f"unknown presets named: {set(named) - rungs}"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_commands_and_flags_in_the_docs_exist():
    root = build_parser()
    checked, bad = 0, []
    for page in PAGES:
        text = re.sub(r"\\\n\s*", " ", page.read_text())  # join continued shell lines
        for line in text.splitlines():
            for m in re.finditer(r"(?<![\w/.-])testbed((?: [a-z][a-z-]*)+)([^`|;&#]*)", line):
                words = m.group(1).split()
                if words[0] not in subcommands(root):
                    continue  # prose ("the testbed trainer"), not a command
                node = root
                for word in words:
                    node = subcommands(node).get(word, node)
                options = {o for a in node._actions for o in a.option_strings}
                for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", m.group(0)):
                    checked += 1
                    if flag not in options:
                        bad.append(f"{page.name}: {flag} in `{m.group(0).strip()}`")
    assert checked > 20
    assert not bad, "flags the CLI does not have:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_paths_in_the_docs_exist(page):
    text = page.read_text()
    missing = []
    for m in re.finditer(r"(?<![\w./$-])((?:configs|slurm|scripts|tests|docs|testbed|\.ci)/[\w./*<>-]*)", text):
        path = m.group(1).rstrip(".")
        if "*" in path or "<" in path:
            found = any(REPO.glob(re.sub(r"<[^>]+>", "*", path)))
        else:
            found = (REPO / path).exists() or (page.parent / path).exists()
        if not found:
            missing.append(path)
    for link in re.findall(r"\]\(([^)#:]+)", text):
        if not (page.parent / link).exists():
            missing.append(link)
    assert not missing, f"{page.name} names paths that do not exist: {missing}"
