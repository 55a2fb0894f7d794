"""Real text that needs no network, for the studies' `cpu` and `gpu` sizes: the Python standard
library's own source files, read from this interpreter's installation.

`stdlib_corpus()` writes them once as JSONL (one document per .py file, in sorted path order,
the standard library's own test suite included: about 30 MB, 8-9M tokens at a 4096 vocabulary)
and tokenises them with `testbed data prepare` (byte-level BPE, 2% of the files held out for
validation), cached under $TESTBED_CACHE or ~/.cache/testbed. The folder name carries the
corpus version, the Python version and the vocabulary size, so a different interpreter (or an
older recipe's folder) is never mistaken for this one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from testbed.errors import TestbedError

VOCAB_SIZE = 4096
VERSION = 2  # 2: the test suite included, 2% validation
VAL_FRACTION = 0.02
# Bytes per token of the BPE at VOCAB_SIZE is 3.36 on Python 3.11's library; planning before the
# corpus exists assumes a generous 4.0, so a recipe that fits the estimate fits the real corpus.
BYTES_PER_TOKEN_BOUND = 4.0


def cache_root() -> Path:
    return Path(os.environ.get("TESTBED_CACHE") or Path.home() / ".cache" / "testbed")


def stdlib_path(vocab_size: int = VOCAB_SIZE) -> Path:
    """Where the prepared corpus lives (prepared or not)."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / "studies" / f"stdlib{VERSION}-{version}-bpe{vocab_size}"


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # Third-party packages differ between machines; the rest is fixed by the Python version.
    skip = ("site-packages", "idlelib", "__pycache__")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


def stdlib_corpus(vocab_size: int = VOCAB_SIZE, log=print) -> Path:
    """The prepared folder, made on first use (a minute or two on 2 cores)."""
    out = stdlib_path(vocab_size)
    if (out / "manifest.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    source = out.parent / f"{out.name}.jsonl"
    if not source.is_file():
        tmp = source.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for path in stdlib_files():
                text = path.read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    fh.write(json.dumps({"text": text}) + "\n")
        os.replace(tmp, source)
    log(f"preparing the standard-library corpus in {out} (once)")
    command = [sys.executable, "-m", "testbed", "data", "prepare", "--source", str(source),
               "--vocab-size", str(vocab_size), "--val-fraction", str(VAL_FRACTION), "--out", str(out)]
    if subprocess.run(command).returncode != 0:
        raise TestbedError(f"preparing the standard-library corpus failed; run {' '.join(command)}")
    return out


def train_tokens(vocab_size: int = VOCAB_SIZE) -> tuple[int, bool]:
    """(training tokens of the corpus, whether that is the prepared count or a lower estimate)."""
    manifest = stdlib_path(vocab_size) / "manifest.json"
    if manifest.is_file():
        return int(json.loads(manifest.read_text())["splits"]["train"]["tokens"]), True
    size = sum(p.stat().st_size for p in stdlib_files())
    return int(size * (1 - VAL_FRACTION) / BYTES_PER_TOKEN_BOUND), False


def ensure_for(specs: list[dict]) -> None:
    """Prepare the corpus if a sweep's base reads it."""
    for spec in specs:
        path = ((spec.get("base") or {}).get("data") or {}).get("path")
        if path and Path(path).name.startswith("stdlib") and Path(path).parent == stdlib_path().parent:
            vocab = int(Path(path).name.rsplit("bpe", 1)[1])
            stdlib_corpus(vocab)
