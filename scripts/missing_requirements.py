#!/usr/bin/env python
"""Print the requirements of pyproject.toml (and the test extra) this environment lacks, one
pip argument each; nothing when all are importable. Used by setup.sh to install only what a
site environment misses, without touching the packages it has (its torch above all)."""

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def requirements(pyproject: Path) -> list[str]:
    text = pyproject.read_text()
    if tomllib is not None:
        project = tomllib.loads(text)["project"]
        return project["dependencies"] + project.get("optional-dependencies", {}).get("test", [])
    # Python 3.10 has no TOML reader: take the quoted items of the two arrays named here only.
    blocks = re.findall(r'^(?:dependencies|test)\s*=\s*\[(.*?)\]', text, re.M | re.S)
    return [item for block in blocks for item in re.findall(r'"([^"]+)"', block)]


def main() -> int:
    missing = []
    for req in requirements(Path(__file__).resolve().parents[1] / "pyproject.toml"):
        name = re.split(r"[<>=!~\[; ]", req, 1)[0]
        try:
            version(name)
        except PackageNotFoundError:
            missing.append(req)
    print(" ".join(missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
