"""Where documents come from, and which of them are held out for validation.

A source is either local files (plain text, JSONL or Parquet; a file, a folder, or a glob) or
a Hugging Face hub dataset streamed by name, config and split. Both are read through
`datasets.load_dataset(..., streaming=True)` and turned into one ordered stream of document
strings by the same function, so what the tests check on local files holds for the hub too.
With `reader="plain"` local files are read without `datasets` (a GPU node without network
lacks it) by a plain reader (`Source._plain_texts`: JSON Lines line by line, text by paragraph,
Parquet through pyarrow) that yields the same documents.

Plain-text files hold one document per blank-line-separated block (a paragraph): a folder of
`.txt` books then gives many documents rather than a handful of huge ones.

The train/validation split is a pure function of each document's text: the blake2b hash of its
UTF-8 bytes, read as a number in [0, 1), is compared with a threshold. It does not depend on the
tokenizer, the number of workers or the order the files are listed in.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import heapq
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from testbed.errors import TestbedError

# File suffix -> `datasets` builder that reads it.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Builders that read bytes as UTF-8 and so need invalid bytes replaced beforehand;
# Parquet strings are UTF-8 by construction.
DECODED_BUILDERS = {"text", "json"}

DEFAULT_VAL_FRACTION = 0.005
# Tiny corpora would otherwise get an empty validation split at val_fraction=0.005.
DEFAULT_MIN_VAL_DOCS = 4
HASH_SPACE = 2**64


def document_hash(utf8: bytes) -> int:
    """64-bit hash of a document's UTF-8 bytes; decides its split."""
    return int.from_bytes(hashlib.blake2b(utf8, digest_size=8).digest(), "big")


def split_threshold(val_fraction: float, smallest_hashes: list[int], min_val_docs: int) -> int:
    """Hash threshold below which a document is in the validation split.

    It is `val_fraction` of the hash space, raised just enough that the `min_val_docs` documents
    with the smallest hashes are included when the fraction alone would give fewer.
    """
    threshold = int(val_fraction * HASH_SPACE)
    ranked = sorted(smallest_hashes)
    if min_val_docs > 0 and ranked:
        kth = ranked[min(min_val_docs, len(ranked)) - 1]
        threshold = max(threshold, kth + 1)
    return threshold


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise TestbedError(
            f"val_fraction={val_fraction} is outside [0, 1); pass a small fraction such as 0.005."
        )


@dataclass
class Document:
    text: str
    utf8_bytes: int
    hash: int


@dataclass
class Source:
    """An ordered, re-readable stream of documents."""

    spec: str
    text_field: str = "text"
    hub_config: str | None = None
    hub_split: str = "train"
    files: list[Path] = field(default_factory=list)  # empty for a hub dataset
    fingerprint: str = ""
    # Invalid UTF-8 sequences replaced by U+FFFD while reading local files.
    non_utf8_replacements: int = 0
    # Local files: "datasets" (its streaming readers) or "plain" (no `datasets` needed, the same
    # documents). A hub dataset always needs `datasets`.
    reader: str = "datasets"
    _readable: list[Path] = field(default_factory=list, repr=False)
    _tmpdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def is_hub(self) -> bool:
        return not self.files

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "kind": "hub" if self.is_hub else "files",
            "files": [str(p) for p in self.files],
            "text_field": self.text_field,
            "hub_config": self.hub_config,
            "hub_split": self.hub_split if self.is_hub else None,
            "fingerprint": self.fingerprint,
        }

    def iter_texts(self) -> Iterator[str]:
        """Every non-empty document, in a fixed order (files sorted by path)."""
        if not self.is_hub and self.reader == "plain":
            yield from self._plain_texts()
            return
        try:
            import datasets
        except ModuleNotFoundError:  # optional: a GPU node may train from prepared shards alone
            raise TestbedError("reading a text source needs the `datasets` package, which is not "
                               "installed here; `pip install datasets`, or prepare the shards on a "
                               "machine that has it and copy the folder (local .jsonl/.txt/.parquet "
                               "files: open_source(..., reader='plain') reads them without it)") from None

        datasets.disable_progress_bars()
        # The JSON reader logs its parse error before raising it; the raise becomes one clear
        # error naming the file and line below, so the log line would only repeat it.
        logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
        if self.is_hub:
            try:
                stream = datasets.load_dataset(
                    self.spec, self.hub_config, split=self.hub_split, streaming=True
                )
            except Exception as err:  # the hub raises many kinds; all mean "cannot open it"
                raise TestbedError(
                    f"source={self.spec!r} (config={self.hub_config!r}, split={self.hub_split!r}) "
                    f"could not be opened as a hub dataset ({type(err).__name__}: {err}); "
                    "check the name, --hub-config and --split, or pass a local path."
                ) from err
            yield from _texts(stream, self.text_field, self.spec)
            return
        # Consecutive files of one format are read by one builder call, in sorted order.
        for builder, group in _runs_by_builder(self._readable):
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            stream = datasets.load_dataset(
                builder, data_files=[str(p) for p in group], split="train", streaming=True, **kwargs
            )
            texts = _texts(stream, "text" if builder == "text" else self.text_field, str(group[0]))
            if builder == "text":
                # Paragraph mode keeps stray newlines around blocks separated by 3+ newlines.
                texts = (t.strip("\n") for t in texts)
            try:
                yield from (t for t in texts if t)
            except TestbedError:
                raise
            except Exception as err:  # the reader's own parse errors (pyarrow) name no line
                if builder != "json":
                    raise
                originals = [self.files[self._readable.index(p)] for p in group]
                raise _json_lines_error(group, originals, err) from None

    def _plain_texts(self) -> Iterator[str]:
        """`iter_texts` for local files without `datasets`: the same documents in the same order."""
        for builder, group in _runs_by_builder(self._readable):
            for path in group:
                original = self.files[self._readable.index(path)]
                if builder == "text":
                    yield from _paragraphs(path)
                    continue
                rows = _parquet_rows(path, self.text_field) if builder == "parquet" else _json_rows(path, original)
                yield from _texts(rows, self.text_field, str(path))

    def iter_documents(self) -> Iterator[Document]:
        for text in self.iter_texts():
            try:
                utf8 = text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates from JSON escapes: replace them too
                text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
                utf8 = text.encode("utf-8")
            yield Document(text, len(utf8), document_hash(utf8))

    def close(self) -> None:
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def _texts(stream, text_field: str, where: str) -> Iterator[str]:
    """The one place rows become document strings, for hub and local sources alike."""
    for row in stream:
        if text_field not in row:
            raise TestbedError(
                f"text_field={text_field!r} is not a column of {where} (columns: "
                f"{sorted(row)}); pass --text-field with one of those."
            )
        text = row[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise TestbedError(
                f"text_field={text_field!r} in {where} holds {type(text).__name__}, not text; "
                "pass --text-field naming a string column."
            )
        if text:
            yield text


def _paragraphs(path: Path) -> Iterator[str]:
    """A text file's blank-line-separated blocks, as `datasets`' text reader (sample_by="paragraph")
    and `iter_texts` make them: split at each empty line, newlines at either end stripped, empty
    blocks dropped. (Files are read whole: a text source's files are books, not the corpus.)"""
    text = path.read_text(encoding="utf-8")
    for block in text.split("\n\n"):
        block = block.strip("\n")
        if block:
            yield block


def _json_lines(path: Path, original: Path) -> Iterator[tuple[dict | None, TestbedError | None]]:
    """Each non-blank line of a JSON Lines file as (its object, None), or (None, the error naming
    `original`:line) for a line that is not a JSON object."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as bad:
                problem = f"is not valid JSON ({bad})"
            else:
                if isinstance(row, dict):
                    yield row, None
                    continue
                problem = f"holds a JSON {type(row).__name__}, not an object"
            yield None, TestbedError(f"{original}:{number} {problem}: {line[:60]!r}; fix or delete that line "
                                     f"(each line of a .jsonl file is one JSON object), then run the same "
                                     f"command again")


def _json_rows(path: Path, original: Path) -> Iterator[dict]:
    """The rows of a JSON Lines file, one JSON object a line (blank lines skipped); a bad line is
    an error naming `original`:line, as with `datasets`."""
    for row, error in _json_lines(path, original):
        if error is not None:
            raise error
        assert row is not None
        yield row


def _parquet_rows(path: Path, text_field: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        yield {name: None for name in table.schema_arrow.names}  # _texts names the columns
        return
    for batch in table.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            yield {text_field: value}


def _json_lines_error(group: list[Path], originals: list[Path], err: Exception) -> TestbedError:
    """The first line of a JSON Lines group that is not a JSON object, as file:line."""
    for path, original in zip(group, originals):
        error = next((e for _, e in _json_lines(path, original) if e is not None), None)
        if error is not None:
            return error
    names = ", ".join(str(p) for p in originals[:3])
    return TestbedError(f"{names} could not be read as JSON Lines ({type(err).__name__}: {err}); check "
                        f"that each line is one JSON object")


def _runs_by_builder(files: list[Path]) -> Iterator[tuple[str, list[Path]]]:
    run: list[Path] = []
    builder = ""  # the builder of `run` (set with its first file)
    for path in files:
        b = BUILDERS[_suffix(path)]
        if run and b != builder:
            yield builder, run
            run = []
        builder = b
        run.append(path)
    if run:
        yield builder, run


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _looks_local(spec: str) -> bool:
    # Hub names are "name" or "owner/name"; anything else that does not exist is a missing path.
    return (
        spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
        or any(ch in spec for ch in "*?[")
        or Path(spec).suffix.lower() in BUILDERS
    )


def resolve_files(spec: str) -> list[Path]:
    """The data files a local spec names, sorted so listing order never matters."""
    expanded = os.path.expanduser(spec)
    if any(ch in expanded for ch in "*?["):
        candidates = [Path(p) for p in glob.glob(expanded, recursive=True)]
        what = "glob"
    elif Path(expanded).is_dir():
        candidates = [p for p in Path(expanded).rglob("*") if p.is_file()]
        what = "folder"
    elif Path(expanded).is_file():
        candidates = [Path(expanded)]
        what = "file"
    else:
        raise TestbedError(
            f"source={spec!r} does not exist; pass an existing file, folder or glob of "
            ".txt/.jsonl/.parquet files, or a hub dataset name such as HuggingFaceFW/fineweb-edu."
        )
    files = sorted(
        (p.resolve() for p in candidates if p.is_file() and _suffix(p) in BUILDERS), key=str
    )
    if not files:
        kinds = "/".join(sorted(BUILDERS))
        raise TestbedError(
            f"source={spec!r} ({what}) contains no {kinds} files; point --source at data files."
        )
    for path in files:
        if path.stat().st_size == 0:
            raise TestbedError(
                f"source file {str(path)!r} is empty; remove it or point --source elsewhere."
            )
    return files


def _files_fingerprint(files: list[Path], text_field: str) -> str:
    # Path, size and mtime stand in for content: cheap for big corpora, and any edit changes it.
    h = hashlib.sha256(f"files\0{text_field}\0".encode())
    for path in files:
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


class _ReplacementCounter:
    """A codec error handler that replaces bad bytes with U+FFFD and counts each sequence."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, err: UnicodeError) -> tuple[str, int]:
        if not isinstance(err, UnicodeDecodeError):  # registered for decoding only
            raise err
        self.count += 1
        return "\ufffd", err.end


_COUNTER = _ReplacementCounter()
codecs.register_error("testbed_count_replace", _COUNTER)


def _is_valid_utf8(path: Path, chunk: int = 1 << 24) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    with open(path, "rb") as fh:
        try:
            while block := fh.read(chunk):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def _sanitised_copy(path: Path, tmpdir: Path, index: int) -> tuple[Path, int]:
    """A UTF-8 copy of `path` with invalid bytes replaced; returns it and the replacement count."""
    before = _COUNTER.count
    decoder = codecs.getincrementaldecoder("utf-8")("testbed_count_replace")
    out = tmpdir / f"{index:06d}-{path.name}"
    with open(path, "rb") as src, open(out, "w", encoding="utf-8") as dst:
        while block := src.read(1 << 24):
            dst.write(decoder.decode(block))
        dst.write(decoder.decode(b"", final=True))
    return out, _COUNTER.count - before


def open_source(
    spec: str | os.PathLike,
    text_field: str = "text",
    hub_config: str | None = None,
    hub_split: str = "train",
    reader: str = "datasets",
) -> Source:
    """Open a local path/glob or a hub dataset name as a `Source` (`reader`: see `Source.reader`).

    Local files with invalid UTF-8 are read through a replaced copy (U+FFFD for each bad
    sequence) in a temporary folder; the count is kept in `non_utf8_replacements`.
    """
    spec = str(spec)
    expanded = os.path.expanduser(spec)
    if not (os.path.exists(expanded) or _looks_local(spec)):
        fp = hashlib.sha256(f"hub\0{spec}\0{hub_config}\0{hub_split}\0{text_field}".encode())
        return Source(spec, text_field, hub_config, hub_split, fingerprint=fp.hexdigest()[:16])
    files = resolve_files(spec)
    if reader not in ("plain", "datasets"):
        raise TestbedError(f"reader={reader!r} is not one of plain, datasets")
    source = Source(spec, text_field, files=files, fingerprint=_files_fingerprint(files, text_field),
                    reader=reader)
    readable = []
    for index, path in enumerate(files):
        if BUILDERS[_suffix(path)] in DECODED_BUILDERS and not _is_valid_utf8(path):
            if source._tmpdir is None:
                source._tmpdir = tempfile.TemporaryDirectory(prefix="testbed-utf8-")
            path, replaced = _sanitised_copy(path, Path(source._tmpdir.name), index)
            source.non_utf8_replacements += replaced
        readable.append(path)
    source._readable = readable
    return source


@dataclass
class SplitPlan:
    """The outcome of one pass over a source: corpus counts and the validation threshold."""

    documents: int
    bytes: int
    threshold: int
    val_fraction: float
    min_val_docs: int

    def is_validation(self, doc_hash: int) -> bool:
        return doc_hash < self.threshold

    def to_dict(self) -> dict:
        return {
            "documents": self.documents,
            "bytes": self.bytes,
            "threshold": self.threshold,
            "val_fraction": self.val_fraction,
            "min_val_docs": self.min_val_docs,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SplitPlan:
        return cls(**{k: d[k] for k in ("documents", "bytes", "threshold", "val_fraction", "min_val_docs")})


class SplitScanner:
    """Accumulates what the split needs while some other pass reads the documents."""

    def __init__(self, val_fraction: float, min_val_docs: int) -> None:
        check_val_fraction(val_fraction)
        self.val_fraction = val_fraction
        self.min_val_docs = max(0, int(min_val_docs))
        self.documents = 0
        self.bytes = 0
        self._smallest: list[int] = []  # max-heap (negated) of the smallest hashes

    def add(self, doc: Document) -> None:
        self.documents += 1
        self.bytes += doc.utf8_bytes
        if self.min_val_docs:
            if len(self._smallest) < self.min_val_docs:
                heapq.heappush(self._smallest, -doc.hash)
            elif doc.hash < -self._smallest[0]:
                heapq.heapreplace(self._smallest, -doc.hash)

    def plan(self, where: str) -> SplitPlan:
        if self.documents == 0:
            raise TestbedError(
                f"source={where!r} holds no non-empty documents; check the files and --text-field."
            )
        if self.documents <= self.min_val_docs:
            raise TestbedError(
                f"source={where!r} holds only {self.documents} documents, too few for a train and "
                f"a validation split (min_val_docs={self.min_val_docs}); add documents."
            )
        threshold = split_threshold(
            self.val_fraction, [-h for h in self._smallest], self.min_val_docs
        )
        return SplitPlan(self.documents, self.bytes, threshold, self.val_fraction, self.min_val_docs)


def scan_split(source: Source, val_fraction: float = DEFAULT_VAL_FRACTION,
               min_val_docs: int = DEFAULT_MIN_VAL_DOCS) -> SplitPlan:
    """Read the source once to fix the split threshold (see `split_threshold`)."""
    scanner = SplitScanner(val_fraction, min_val_docs)
    for doc in source.iter_documents():
        scanner.add(doc)
    return scanner.plan(source.spec)
