"""The studies' text. `tiny` and `cpu`: the Python standard library's own source files, read
from this interpreter's installation (no network). `gpu-min`: every Python source installed for
this interpreter, the standard library and site-packages (torch, transformers, numpy, ...),
deduplicated by content and made on the machine that trains (no network, no `datasets`; see
`installed_corpus`). `gpu`: FineWeb-Edu's 10B-token sample, streamed from the Hugging Face hub once.

`stdlib_corpus()` writes the library once as JSONL (one document per .py file, in sorted path
order, the standard library's own test suite included: about 30 MB, 8-9M tokens at a 4096
vocabulary) and tokenises it with `testbed data prepare` (byte-level BPE, 2% of the files held
out for validation); `hub_corpus()` prepares the hub sample the same way. Both are cached under
$TESTBED_CACHE or ~/.cache/testbed. A folder's name carries the corpus, its version (the Python
version for the library) and the vocabulary, so another interpreter's (or an older recipe's)
folder is never mistaken for this one; `prepare(path)` makes any folder so named.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
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


# The gpu corpus: FineWeb-Edu's sample-10BT (10B GPT-2 tokens, about 45 GB of text). Before it
# is prepared, plans assume 8B training tokens, below what any BPE of 4096-65536 tokens makes of
# it (GPT-2's 50k vocabulary gives 10B; smaller vocabularies give more tokens).
HUB = {"source": "HuggingFaceFW/fineweb-edu", "hub_config": "sample-10BT", "split": "train"}
HUB_TRAIN_TOKENS_BOUND = 8_000_000_000
HUB_NAME = re.compile(r"fineweb-edu-10BT-(?:nest(?P<nested>\d+)-)?bpe(?P<vocab>\d+)$")

# The gpu-min corpus: the installed Python sources (module docstring). Its size depends on what is
# installed: 328 MB in 18.6k distinct files, 103M tokens at this BPE, for a venv with torch,
# transformers, scipy, pandas, sympy and sklearn on Python 3.11. Before it is prepared, plans
# assume at least 200 MB, at BYTES_PER_TOKEN_BOUND; the prepared folder's count replaces it.
INSTALLED_VERSION = 1
INSTALLED_VAL_FRACTION = 0.01  # of the files, by a hash of their content (one document per file)
INSTALLED_BYTES_BOUND = 200_000_000
INSTALLED_MAX_FILE_BYTES = 1_000_000  # larger .py files are generated tables, not code
INSTALLED_SAMPLE_BYTES = 40_000_000  # the BPE is trained on this much (a seeded, fixed subset)
INSTALLED_NAME = re.compile(r"pysrc(?P<version>\d+)-py\d+-bpe(?P<vocab>\d+)$")

MINI_BYTES = 400_000  # the `mini` flavour: the first files in path order, for tiny studies
NAME = re.compile(r"stdlib(?P<version>\d+)(?P<mini>mini)?-py\d+-(?:nest(?P<nested>\d+)-)?bpe(?P<vocab>\d+)$")
# The library split into three domains (the mixture study): its code, its test suite, and the
# docstrings of both as prose; each tokenised with the one BPE of the library at that vocabulary.
DOMAINS = ("library", "tests", "docstrings")
DOMAIN_NAME = re.compile(r"stdlib(?P<version>\d+)(?P<mini>mini)?-py\d+-(?P<domain>library|tests|docstrings)-bpe(?P<vocab>\d+)$")


def _python() -> str:
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def stdlib_path(vocab_size: int = VOCAB_SIZE, nested_in: int | None = None, mini: bool = False) -> Path:
    """Where a prepared corpus lives (prepared or not). `nested_in`: its BPE is cut from the one
    trained at that larger size (a vocabulary ladder); `mini`: the small flavour."""
    nest = f"nest{nested_in}-" if nested_in else ""
    return cache_root() / "studies" / f"stdlib{VERSION}{'mini' if mini else ''}-{_python()}-{nest}bpe{vocab_size}"


def domain_path(domain: str, vocab_size: int, mini: bool = False) -> Path:
    """Where one domain of the library lives (prepared or not), tokenised with the BPE of
    stdlib_path(vocab_size, mini=mini)."""
    return cache_root() / "studies" / f"stdlib{VERSION}{'mini' if mini else ''}-{_python()}-{domain}-bpe{vocab_size}"


def hub_path(vocab_size: int = VOCAB_SIZE, nested_in: int | None = None) -> Path:
    """Where the prepared gpu corpus at this vocabulary lives (prepared or not)."""
    nest = f"nest{nested_in}-" if nested_in else ""
    return cache_root() / "studies" / f"fineweb-edu-10BT-{nest}bpe{vocab_size}"


def installed_path(vocab_size: int = VOCAB_SIZE) -> Path:
    """Where the prepared gpu-min corpus (the installed Python sources) lives (prepared or not)."""
    return cache_root() / "studies" / f"pysrc{INSTALLED_VERSION}-{_python()}-bpe{vocab_size}"


def path_for(size: str, vocab_size: int = VOCAB_SIZE, nested_in: int | None = None) -> Path:
    """The corpus folder a study of this size reads: the library's mini slice (tiny), the whole
    library (cpu), the installed sources (gpu-min), the hub sample (gpu)."""
    if size == "gpu":
        return hub_path(vocab_size, nested_in)
    if size == "gpu-min":
        if nested_in:
            raise TestbedError("the gpu-min corpus has no nested vocabulary ladder")
        return installed_path(vocab_size)
    return stdlib_path(vocab_size, nested_in, mini=size == "tiny")


@functools.lru_cache(maxsize=2)
def stdlib_files(mini: bool = False) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # Third-party packages differ between machines; the rest is fixed by the Python version.
    skip = ("site-packages", "idlelib", "__pycache__")
    files = sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))
    if not mini:
        return files
    kept, size = [], 0
    for path in files:
        if size >= MINI_BYTES:
            break
        kept.append(path)
        size += path.stat().st_size
    return kept


def _source(mini: bool) -> Path:
    """The corpus as JSONL, one document per file: shared by every vocabulary, so the tokenizer
    sample (keyed by the source's fingerprint) and a ladder's one BPE training are shared too."""
    source = cache_root() / "studies" / f"stdlib{VERSION}{'mini' if mini else ''}-{_python()}.jsonl"
    if not source.is_file():
        source.parent.mkdir(parents=True, exist_ok=True)
        tmp = source.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for path in stdlib_files(mini):
                text = path.read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    fh.write(json.dumps({"text": text}) + "\n")
        os.replace(tmp, source)
    return source


def stdlib_corpus(vocab_size: int = VOCAB_SIZE, nested_in: int | None = None, mini: bool = False,
                  log=print) -> Path:
    """The prepared folder, made on first use (a minute or two on 2 cores for the full corpus)."""
    out = stdlib_path(vocab_size, nested_in, mini)
    if not (out / "manifest.json").is_file():
        log(f"preparing the standard-library corpus in {out} (once)")
        _prepare(out, ["--source", str(_source(mini)), "--val-fraction", str(VAL_FRACTION),
                       "--workers", "2"], vocab_size, nested_in)
    return out


def hub_corpus(vocab_size: int = VOCAB_SIZE, nested_in: int | None = None, log=print) -> Path:
    """The prepared gpu corpus, streamed from the hub and tokenised on first use (hours: it
    reads about 45 GB; every core the process may use tokenises)."""
    from testbed.sweep.local import usable_cores

    out = hub_path(vocab_size, nested_in)
    if not (out / "manifest.json").is_file():
        log(f"preparing {HUB['source']} ({HUB['hub_config']}) in {out} (once)")
        _prepare(out, ["--source", HUB["source"], "--hub-config", HUB["hub_config"], "--split",
                       HUB["split"], "--workers", str(usable_cores())], vocab_size, nested_in)
    return out


def installed_roots() -> list[Path]:
    """Where this interpreter's Python sources are installed: the standard library, then every
    site-packages folder (the interpreter's, a venv's, the user's), each once."""
    import site

    paths = sysconfig.get_paths()
    roots = [paths["stdlib"], paths["purelib"], paths["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        roots.append(site.getusersitepackages())
    return [Path(r).resolve() for r in dict.fromkeys(roots) if Path(r).is_dir()]


def installed_files(roots: list[Path] | None = None) -> list[tuple[str, Path]]:
    """(name, path) of every .py file under `roots` (default: installed_roots()), sorted by name:
    the path relative to its root, prefixed by the root's kind ("stdlib/", "site-packages/"), so
    the order does not depend on where the interpreter lives. A root inside another (the
    standard library's own site-packages) is read as its own root only; __pycache__ is skipped."""
    roots = [Path(r).resolve() for r in (installed_roots() if roots is None else roots)]
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    named: dict[Path, str] = {}
    for root in roots:
        kind = ("stdlib" if root == stdlib else "site-packages"
                if root.name in ("site-packages", "dist-packages") else root.name)
        inner = [r for r in roots if r != root and root in r.parents]
        for path in root.rglob("*.py"):
            if "__pycache__" in path.parts or any(r in path.parents for r in inner) or not path.is_file():
                continue
            if any(part in ("site-packages", "dist-packages") for part in path.relative_to(root).parts):
                continue  # another interpreter's packages under the standard library's folder
            named.setdefault(path.resolve(), f"{kind}/{path.relative_to(root).as_posix()}")
    return sorted(((name, path) for path, name in named.items()), key=lambda item: item[0])


def write_installed_jsonl(out: Path, roots: list[Path] | None = None,
                          max_file_bytes: int = INSTALLED_MAX_FILE_BYTES) -> dict:
    """The installed sources as JSONL, one document per distinct file (by the sha256 of its bytes;
    the first by name is kept), in name order; returns what it holds: files, bytes, the duplicates
    and oversized files left out, and `content_sha256`, the sha256 of the sorted per-file digests,
    which names the corpus's content whatever the paths or the machine."""
    seen: set[bytes] = set()
    kept: list[bytes] = []
    files = duplicates = oversized = empty = 0
    total = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for name, path in installed_files(roots):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if len(data) > max_file_bytes:
                oversized += 1
                continue
            digest = hashlib.sha256(data).digest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            text = data.decode("utf-8", errors="replace")
            if not text.strip():
                empty += 1
                continue
            fh.write(json.dumps({"text": text}) + "\n")
            kept.append(digest)
            files += 1
            total += len(text.encode("utf-8"))
    os.replace(tmp, out)
    content = hashlib.sha256(b"".join(sorted(kept))).hexdigest()
    return {"kind": "installed Python sources", "python": sys.version.split()[0],
            "roots": [str(r) for r in (installed_roots() if roots is None else roots)],
            "files": files, "bytes": total, "duplicates_dropped": duplicates,
            "oversized_dropped": oversized, "empty_dropped": empty, "max_file_bytes": max_file_bytes,
            "content_sha256": content, "val_fraction": INSTALLED_VAL_FRACTION,
            "split": "by file: a blake2b hash of each file's text below val_fraction of the hash space"}


def installed_corpus(vocab_size: int = VOCAB_SIZE, log=print, roots: list[Path] | None = None,
                     out: Path | None = None, workers: int | None = None,
                     sample_bytes: int = INSTALLED_SAMPLE_BYTES) -> Path:
    """The prepared gpu-min folder, made on first use from the sources installed here (no network,
    no `datasets`: the JSONL is read by the plain reader). The BPE is trained on a seeded subset of
    `sample_bytes`; every core this process may use tokenises. The manifest gains a `corpus`
    block (write_installed_jsonl's record and the build time), sealed by its checksum."""
    import time

    from testbed.data.shards import manifest_checksum, prepare
    from testbed.data.sources import open_source
    from testbed.rundir import write_text_atomic
    from testbed.sweep.local import usable_cores

    out = out or installed_path(vocab_size)
    if (out / "manifest.json").is_file():
        return out
    started = time.perf_counter()
    log(f"preparing the installed Python sources in {out} (once)")
    jsonl = out.parent / f"{out.name}.jsonl"
    record = write_installed_jsonl(jsonl, roots)
    log(f"{record['files']:,} distinct files, {record['bytes'] / 1e6:.1f} MB "
        f"({record['duplicates_dropped']:,} duplicates dropped), content sha256 {record['content_sha256'][:16]}")
    source = open_source(jsonl, reader="plain")
    try:
        manifest = prepare(source, out, vocab_size=vocab_size, workers=workers or usable_cores(),
                           val_fraction=INSTALLED_VAL_FRACTION, sample_bytes=sample_bytes,
                           log=lambda message: log(message))
    finally:
        source.close()
    manifest.pop("_run", None)
    manifest["corpus"] = {**record, "build_s": round(time.perf_counter() - started, 1)}
    manifest["checksum"] = manifest_checksum(manifest)
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    jsonl.unlink(missing_ok=True)
    log(f"prepared {manifest['splits']['train']['tokens']:,} training tokens in "
        f"{manifest['corpus']['build_s']:.0f} s")
    return out


def _prepare(out: Path, args: list[str], vocab_size: int, nested_in: int | None) -> None:
    command = [sys.executable, "-m", "testbed", "data", "prepare", *args,
               "--vocab-size", str(vocab_size), "--out", str(out)]
    if nested_in:
        command += ["--nested-in", str(nested_in)]
    if subprocess.run(command).returncode != 0:
        raise TestbedError(f"preparing the corpus {out.name} failed; run {' '.join(command)}")


def parse(path: str | Path) -> dict | None:
    """For a folder named by stdlib_path, installed_path or hub_path: its corpus ("stdlib",
    "installed" or "hub") and the arguments that make it; None for any other folder."""
    path = Path(path)
    if path.parent != cache_root() / "studies":
        return None
    match = INSTALLED_NAME.match(path.name)
    if match:
        if int(match["version"]) != INSTALLED_VERSION:
            return None
        return {"corpus": "installed", "vocab_size": int(match["vocab"])}
    match = DOMAIN_NAME.match(path.name)
    if match:
        if int(match["version"]) != VERSION:
            return None
        return {"corpus": "domain", "domain": match["domain"], "vocab_size": int(match["vocab"]),
                "mini": bool(match["mini"])}
    match = HUB_NAME.match(path.name)
    if match:
        return {"corpus": "hub", "vocab_size": int(match["vocab"]),
                "nested_in": int(match["nested"]) if match["nested"] else None}
    match = NAME.match(path.name)
    if not match or int(match["version"]) != VERSION:
        return None
    return {"corpus": "stdlib", "vocab_size": int(match["vocab"]), "mini": bool(match["mini"]),
            "nested_in": int(match["nested"]) if match["nested"] else None}


def prepare(path: str | Path) -> Path:
    """Make the corpus folder `path` (named by stdlib_path or hub_path) unless it is made."""
    args = parse(path)
    if args is None:
        raise TestbedError(f"{str(path)!r} is not a study corpus folder; prepare it with testbed data prepare")
    kind = args.pop("corpus")
    if kind == "installed":
        return installed_corpus(**args)
    if kind == "domain":
        return domain_corpus(**args)
    return stdlib_corpus(**args) if kind == "stdlib" else hub_corpus(**args)


def train_tokens(path: str | Path | None = None) -> tuple[int, bool]:
    """(training tokens of a study corpus folder (default: the cpu one), whether that is the
    prepared count or a lower estimate made before preparing)."""
    path = Path(path) if path else stdlib_path()
    manifest = path / "manifest.json"
    if manifest.is_file():
        return int(json.loads(manifest.read_text())["splits"]["train"]["tokens"]), True
    args = parse(path) or {"corpus": "stdlib", "mini": False}
    if args["corpus"] == "hub":
        return HUB_TRAIN_TOKENS_BOUND, False
    if args["corpus"] == "installed":
        return int(INSTALLED_BYTES_BOUND * (1 - INSTALLED_VAL_FRACTION) / BYTES_PER_TOKEN_BOUND), False
    if args["corpus"] == "domain":
        size = sum(len(text.encode()) for text in domain_texts(args["domain"], args["mini"]))
        return int(size * (1 - VAL_FRACTION) / BYTES_PER_TOKEN_BOUND), False
    size = sum(p.stat().st_size for p in stdlib_files(args["mini"]))
    return int(size * (1 - VAL_FRACTION) / BYTES_PER_TOKEN_BOUND), False


def ensure_for(specs: list[dict]) -> None:
    """Prepare every study corpus a study's sweeps read (their base's data.path, or a data.path
    axis of the grid)."""
    for path in spec_paths(specs):
        if parse(path) is not None:
            prepare(path)


def spec_paths(specs: list[dict]) -> list[str]:
    """The data folders a study's sweeps read: their base's data.path, a data.path axis of the
    grid, and the folders of a mixture source (data.source_options.sources), each once."""
    paths = []
    for spec in specs:
        data = (spec.get("base") or {}).get("data") or {}
        paths.append(data.get("path"))
        paths += list((spec.get("grid") or {}).get("data.path") or [])
        paths += list(((data.get("source_options") or {}).get("sources") or {}).values())
    return list(dict.fromkeys(p for p in paths if p))


# ----------------------------------------------------------------------------- domains


def _is_test(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return any(part in ("test", "tests") for part in parts[:-1]) or parts[-1].startswith("test_")


def _docstrings(text: str) -> str:
    """A module's docstrings (module, classes, functions), in source order, one paragraph each."""
    import ast

    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # the test suite holds deliberately broken files
        return ""
    nodes = [tree, *(n for n in ast.walk(tree)
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    found = [(getattr(n, "lineno", 0), ast.get_docstring(n)) for n in nodes]
    return "\n\n".join(doc for _, doc in sorted(found, key=lambda item: item[0]) if doc)


def domain_texts(domain: str, mini: bool = False) -> list[str]:
    """The documents of one domain, one per library file in path order: `library` the code of
    the files outside the test suite, `tests` the code of the test suite's files, `docstrings`
    every file's docstrings; `mini`: the domain's first MINI_BYTES."""
    if domain not in DOMAINS:
        raise TestbedError(f"domain {domain!r} is not one of {', '.join(DOMAINS)}")
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in stdlib_files():
        if mini and size >= MINI_BYTES:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        if domain == "docstrings":
            text = _docstrings(text)
        elif (domain == "tests") != _is_test(path, root):
            continue
        if text.strip():
            texts.append(text)
            size += len(text.encode())
    return texts


def domain_corpus(domain: str, vocab_size: int, mini: bool = False, log=print) -> Path:
    """The prepared folder of one domain, made on first use with the library's own BPE at this
    vocabulary (prepared first if need be), so every domain shares one tokenizer."""
    out = domain_path(domain, vocab_size, mini)
    if not (out / "manifest.json").is_file():
        tokenizer = stdlib_corpus(vocab_size, mini=mini, log=log)
        source = cache_root() / "studies" / f"{out.name}.jsonl"
        log(f"preparing the library's {domain} in {out} (once)")
        tmp = source.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for text in domain_texts(domain, mini):
                fh.write(json.dumps({"text": text}) + "\n")
        os.replace(tmp, source)
        command = [sys.executable, "-m", "testbed", "data", "prepare", "--source", str(source),
                   "--val-fraction", str(VAL_FRACTION), "--tokenizer", str(tokenizer), "--workers", "2",
                   "--quiet", "--out", str(out)]
        if subprocess.run(command).returncode != 0:
            raise TestbedError(f"preparing the corpus {out.name} failed; run {' '.join(command)}")
    return out

