"""Token shards: a source tokenised into memory-mapped files, and the reader the trainer uses.

Layout of a prepared folder:
    manifest.json               counts, dtype, EOS id, shard list (tokens, sha256), fingerprints
    tokenizer.json (+ config)   the tokenizer, loadable with transformers.AutoTokenizer
    token_bytes.npy             int64 [V]: UTF-8 bytes each token decodes to (bits per byte)
    train-00000.bin ...         raw little-endian uint16/uint32 tokens; each document then EOS
    validation-00000.bin ...
    progress.json               only while `prepare` runs: the shards finished so far

Shards hold whole documents and close at the first document boundary at or past
`shard_tokens`. A shard is written to a temporary name, then renamed, then recorded in
progress.json, so a killed run leaves only whole shards behind; the next run verifies them
(size and sha256), skips their documents without tokenising them, and carries on. Documents are
tokenised independently, so the bytes written never depend on batching or worker count.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from testbed import progress
from testbed.data.sources import (
    DEFAULT_MIN_VAL_DOCS,
    DEFAULT_VAL_FRACTION,
    Source,
    SplitPlan,
    SplitScanner,
    check_val_fraction,
    open_source,
)
from testbed.data.tokenizer import (
    DEFAULT_SAMPLE_BYTES,
    TextTokenizer,
    _key,
    cache_root,
    draw_sample,
    load_pretrained,
    token_byte_lengths_info,
    train_bpe,
    truncate_bpe,
)
from testbed.errors import TestbedError
from testbed.rundir import write_text_atomic

SPLITS = ("train", "validation")
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 50_000_000
BATCH_BYTES = 1 << 20  # text handed to one encode_batch call; small enough to keep workers busy
# Test hook: seconds to sleep after each finished shard, so a kill can land mid-run.
PAUSE_ENV = "TESTBED_PREPARE_PAUSE_AFTER_SHARD"


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def _is_ours(name: str) -> bool:
    return (
        name in {"manifest.json", "progress.json", "token_bytes.npy", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", ".verified.json"}
        or name.endswith(".bin") and name.split("-")[0] in SPLITS
        or name.startswith(".") and ".tmp-" in name
    )


# --------------------------------------------------------------------------- tokenising


def _encode(tokenizer_backend, texts: list[str], eos_id: int, dtype: str):
    """Tokens of a batch (each document followed by EOS) and each document's token count."""
    encodings = tokenizer_backend.encode_batch_fast(texts, add_special_tokens=False)
    flat: list[int] = []
    counts = np.empty(len(encodings), dtype=np.int64)
    for i, enc in enumerate(encodings):
        ids = enc.ids
        flat.extend(ids)
        flat.append(eos_id)
        counts[i] = len(ids) + 1
    return np.array(flat, dtype=dtype), counts


_WORKER: dict = {}


def _die_with_parent(parent: int) -> None:
    """A worker is killed when the process that started it dies, however it dies (SIGKILL
    included): Linux's PR_SET_PDEATHSIG. Elsewhere workers notice at their next task."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


def _worker_init(tokenizer_json: str, eos_id: int, dtype: str, parent: int) -> None:
    _die_with_parent(parent)
    # One thread per process: `workers` then means cores, and processes don't oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer

    _WORKER.update(tok=Tokenizer.from_str(tokenizer_json), eos=eos_id, dtype=dtype)


def _worker_encode(job):
    split, texts, nbytes = job
    tokens, counts = _encode(_WORKER["tok"], texts, _WORKER["eos"], _WORKER["dtype"])
    return split, tokens, counts, nbytes


# --------------------------------------------------------------------------- writing


@dataclass
class _SplitWriter:
    """Collects one split's tokens and writes a shard at each document boundary past the size."""

    split: str
    out: Path
    shard_tokens: int
    token_bytes: np.ndarray
    records: list[dict]
    on_shard: Callable[[dict], None]  # told of each shard written (its record)
    pending: list[np.ndarray] = field(default_factory=list)
    pending_tokens: int = 0
    pending_docs: int = 0
    pending_bytes: int = 0

    def add(self, tokens: np.ndarray, counts: np.ndarray, nbytes: np.ndarray) -> None:
        ends = np.cumsum(counts)
        start_doc, start_tok = 0, 0
        while start_doc < len(counts):
            need = self.shard_tokens - self.pending_tokens
            # First document (from start_doc) whose end brings the shard to `need` tokens.
            cut = int(np.searchsorted(ends[start_doc:] - start_tok, need)) + start_doc
            if cut >= len(counts):
                self._take(tokens[start_tok:], len(counts) - start_doc, nbytes[start_doc:])
                return
            end_tok = int(ends[cut])
            self._take(tokens[start_tok:end_tok], cut + 1 - start_doc, nbytes[start_doc:cut + 1])
            self.flush()
            start_doc, start_tok = cut + 1, end_tok

    def _take(self, tokens, docs, nbytes) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        self.pending_docs += docs
        self.pending_bytes += int(np.sum(nbytes))

    def flush(self) -> None:
        if not self.pending_docs:
            return
        data = np.concatenate(self.pending)
        name = _shard_name(self.split, len(self.records))
        tmp = self.out / f".{name}.tmp-{os.getpid()}"
        with open(tmp, "wb") as fh:
            data.tofile(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.out / name)
        self.records.append({
            "file": name,
            "split": self.split,
            "tokens": int(len(data)),
            "documents": self.pending_docs,
            "bytes": self.pending_bytes,
            "token_bytes": int(self.token_bytes[data].sum()),
            "sha256": hashlib.sha256(data.data.cast("B")).hexdigest(),
        })
        self.pending, self.pending_tokens, self.pending_docs, self.pending_bytes = [], 0, 0, 0
        self.on_shard(self.records[-1])


def _split_plan(source: Source, val_fraction: float, min_val_docs: int, cache_dir) -> SplitPlan:
    """The split threshold for a pretrained tokenizer (a trained one gets it from its sample)."""
    path = cache_root(cache_dir) / "splits" / f"{_key('split', source.fingerprint, val_fraction, min_val_docs)}.json"
    if path.exists():
        return SplitPlan.from_dict(json.loads(path.read_text()))
    scanner = SplitScanner(val_fraction, min_val_docs)  # scan_split, with progress
    with progress.Progress("split: reading the source", unit="B", unit_scale=True) as bar:
        for doc in source.iter_documents():
            scanner.add(doc)
            bar.update(doc.utf8_bytes)
    plan = scanner.plan(source.spec)
    write_text_atomic(path, json.dumps(plan.to_dict()))
    return plan


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise TestbedError(f"out={str(out)!r} is a file; pass a folder for the shards.")
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if not _is_ours(p.name))
        if foreign and not (out / "manifest.json").exists() and not (out / "progress.json").exists():
            raise TestbedError(
                f"out={str(out)!r} already holds other files ({', '.join(foreign[:3])}); pass a new "
                "or empty folder for the shards."
            )


def _verified_finished(out: Path, records: list[dict], dtype: str) -> dict[str, list[dict]]:
    """Per split, the leading run of recorded shards whose files still match; later ones are redone."""
    kept: dict[str, list[dict]] = {s: [] for s in SPLITS}
    broken = set()
    for rec in records:
        path = out / rec["file"]
        if rec["split"] in broken:
            continue
        if not path.exists() or path.stat().st_size != rec["tokens"] * np.dtype(dtype).itemsize:
            broken.add(rec["split"])
            continue
        if _sha256_file(path) != rec["sha256"]:
            broken.add(rec["split"])
            continue
        kept[rec["split"]].append(rec)
    return kept


def prepare(
    source: Source | str | os.PathLike,
    out: str | os.PathLike,
    *,
    vocab_size: int | None = None,
    tokenizer: str | None = None,
    nested_in: int | None = None,
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    min_val_docs: int = DEFAULT_MIN_VAL_DOCS,
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    text_field: str = "text",
    log=None,
) -> dict:
    """Tokenise `source` into shards under `out` and return the manifest (resumes if killed).

    Exactly one of `vocab_size` (train byte-level BPE on a sample of the training split) and
    `tokenizer` (pretrained name or path) must be given. With `nested_in`, BPE is trained (once,
    cached) at that larger size and cut to `vocab_size` by keeping its first merges, so folders
    prepared at several sizes with one `nested_in` hold a nested tokenizer family (docs/data.md).
    The returned manifest also carries
    `_run` (bytes tokenised by this call and seconds spent), which is not written to disk.
    """
    log = log or (lambda msg: None)
    _check_arguments(vocab_size, tokenizer, nested_in, workers, shard_tokens, val_fraction)
    out = Path(out)
    _check_out_dir(out)
    if not isinstance(source, Source):
        opened = open_source(source, text_field)
        try:
            return prepare(opened, out, vocab_size=vocab_size, tokenizer=tokenizer, nested_in=nested_in,
                           workers=workers,
                           shard_tokens=shard_tokens, val_fraction=val_fraction,
                           min_val_docs=min_val_docs, sample_bytes=sample_bytes, seed=seed,
                           cache_dir=cache_dir, log=log)
        finally:
            opened.close()

    tok, plan = _tokenizer_and_plan(source, vocab_size, tokenizer, nested_in, val_fraction=val_fraction,
                                    min_val_docs=min_val_docs, sample_bytes=sample_bytes, seed=seed,
                                    cache_dir=cache_dir)
    dtype = dtype_for(tok.vocab_size)
    token_bytes, exact = token_byte_lengths_info(tok)
    settings = {
        "format": FORMAT_VERSION,
        "source_fingerprint": source.fingerprint,
        "tokenizer_fingerprint": tok.fingerprint,
        "split_threshold": plan.threshold,
        "shard_tokens": shard_tokens,
        "dtype": dtype,
    }
    settings_key = _key(json.dumps(settings, sort_keys=True))

    manifest_path, progress_path = out / "manifest.json", out / "progress.json"
    if manifest_path.exists():
        return _already_prepared(out, settings_key, log)
    by_split = _finished_shards(out, progress_path, settings_key, dtype, log)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    np.save(out / "token_bytes.npy", token_bytes)

    done_docs = {s: sum(r["documents"] for r in by_split[s]) for s in SPLITS}
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)

    def save_progress() -> None:
        shards = [r for s in SPLITS for r in by_split[s]]
        write_text_atomic(progress_path, json.dumps(
            {"settings_key": settings_key, "settings": settings, "shards": shards}, indent=1))

    def shard_done(record: dict) -> None:
        save_progress()
        log(f"wrote {record['file']} ({record['tokens']} tokens)")
        if pause:
            time.sleep(pause)

    writers = {s: _SplitWriter(s, out, shard_tokens, token_bytes, by_split[s], shard_done) for s in SPLITS}
    save_progress()

    started = time.perf_counter()
    tokenised_bytes = _tokenise(source, plan, tok, dtype, workers, writers, done_docs)
    for w in writers.values():
        w.flush()
    seconds = time.perf_counter() - started

    manifest = _manifest(out, source, tok, plan, dtype, settings, settings_key, by_split, exact, shard_tokens)
    _write_manifest(out, manifest, source, plan)
    manifest_stats = {"tokenised_bytes": tokenised_bytes, "seconds": seconds}
    log(f"prepared {manifest['tokens']} tokens in {len(manifest['shards'])} shard(s); "
        f"tokenised {tokenised_bytes / 1e6:.1f} MB in {seconds:.1f} s")
    manifest["_run"] = manifest_stats  # not written: how much this call tokenised, for benchmarks
    return manifest


def _check_arguments(vocab_size: int | None, tokenizer: str | None, nested_in: int | None, workers: int,
                     shard_tokens: int, val_fraction: float) -> None:
    """`prepare`'s arguments, checked before anything is read or written."""
    if (vocab_size is None) == (tokenizer is None):
        raise TestbedError("pass exactly one of --vocab-size (train BPE) and --tokenizer (pretrained).")
    if nested_in is not None and (vocab_size is None or nested_in < vocab_size):
        raise TestbedError(f"--nested-in {nested_in} needs --vocab-size at most {nested_in}: the "
                           f"tokenizer is cut from a BPE trained at the --nested-in size.")
    if workers < 1:
        raise TestbedError(f"workers={workers} must be at least 1; pass --workers 1 or more.")
    if shard_tokens < 1:
        raise TestbedError(f"shard_tokens={shard_tokens} must be positive; pass e.g. 50000000.")
    check_val_fraction(val_fraction)


def _tokenizer_and_plan(source: Source, vocab_size: int | None, tokenizer: str | None, nested_in: int | None, *,
                        val_fraction: float, min_val_docs: int, sample_bytes: int, seed: int,
                        cache_dir) -> tuple[TextTokenizer, SplitPlan]:
    """The tokenizer (BPE trained on a sample of the training split, possibly cut from a larger
    one, or a pretrained one) and the train/validation split of `source`."""
    if vocab_size is not None:
        sample = draw_sample(source, sample_bytes, seed, val_fraction, min_val_docs, cache_dir)
        if nested_in is not None and nested_in > vocab_size:
            return truncate_bpe(train_bpe(sample, nested_in, cache_dir), vocab_size), sample.plan
        return train_bpe(sample, vocab_size, cache_dir), sample.plan
    assert tokenizer is not None  # exactly one of the two (checked by _check_arguments)
    tok = load_pretrained(tokenizer)
    return tok, _split_plan(source, val_fraction, min_val_docs, cache_dir)


def _settings_clash(out: Path) -> TestbedError:
    return TestbedError(f"out={str(out)!r} already holds shards prepared with other settings "
                        "(source, tokenizer, split or shard size); pass a new --out, or delete that folder "
                        "to rebuild it.")


def _already_prepared(out: Path, settings_key: str, log) -> dict:
    """The manifest of a folder finished with the same settings, its shards verified."""
    existing = read_manifest(out)
    if existing.get("settings_key") != settings_key:
        raise _settings_clash(out)
    TokenShards(out, verify="full")  # raises if a shard was damaged since
    log(f"{out} is already prepared")
    return existing


def _finished_shards(out: Path, progress_path: Path, settings_key: str, dtype: str, log) -> dict[str, list[dict]]:
    """Per split, the shards an interrupted run with the same settings finished (and that still
    match their records); none without progress.json."""
    if not progress_path.exists():
        return {s: [] for s in SPLITS}
    try:
        progress = json.loads(progress_path.read_bytes().decode("utf-8"))
    except ValueError as err:
        raise TestbedError(f"{progress_path} is damaged ({err}); delete it (the shards are then "
                           f"written again) and run the same command again") from None
    if progress.get("settings_key") != settings_key:
        raise _settings_clash(out)
    by_split = _verified_finished(out, progress["shards"], dtype)
    log(f"resuming: {sum(map(len, by_split.values()))} finished shard(s) kept")
    return by_split


def _write_manifest(out: Path, manifest: dict, source: Source, plan: SplitPlan) -> None:
    """Check that the source did not change while it was read, then seal the manifest (token_bytes
    hash, checksum), write it and remove progress.json and leftover temporary files."""
    counted = manifest["documents"]
    if counted != plan.documents:
        raise TestbedError(
            f"source={source.spec!r} changed while it was being prepared ({plan.documents} documents "
            f"when scanned, {counted} now); run testbed data prepare again once it is stable."
        )
    manifest["token_bytes_sha256"] = _sha256_file(out / "token_bytes.npy")
    manifest["checksum"] = manifest_checksum(manifest)
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    (out / "progress.json").unlink(missing_ok=True)
    for leftover in out.glob(".*.tmp-*"):
        leftover.unlink(missing_ok=True)


def _tokenise(source, plan, tok: TextTokenizer, dtype, workers, writers, done_docs) -> int:
    """Read documents once, tokenise those not already in finished shards, feed the writers."""
    seen = {s: 0 for s in SPLITS}
    tokenised = 0
    bar = progress.Progress("tokenising", total=plan.documents, unit="doc")

    def batches():
        nonlocal tokenised
        open_batch = {s: ([], []) for s in SPLITS}
        held = {s: 0 for s in SPLITS}
        for doc in source.iter_documents():
            bar.update()
            split = "validation" if plan.is_validation(doc.hash) else "train"
            seen[split] += 1
            if seen[split] <= done_docs[split]:
                continue
            texts, nbytes = open_batch[split]
            texts.append(doc.text)
            nbytes.append(doc.utf8_bytes)
            held[split] += doc.utf8_bytes
            if held[split] >= BATCH_BYTES:
                tokenised += held[split]
                yield split, texts, np.array(nbytes, dtype=np.int64)
                open_batch[split], held[split] = ([], []), 0
        for split in SPLITS:
            texts, nbytes = open_batch[split]
            if texts:
                tokenised += held[split]
                yield split, texts, np.array(nbytes, dtype=np.int64)

    if workers == 1:
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process means one core
        try:
            for split, texts, nbytes in batches():
                tokens, counts = _encode(tok.backend, texts, tok.eos_id, dtype)
                writers[split].add(tokens, counts, nbytes)
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
        bar.close()
        return tokenised

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn: forking after tokenizers' threads ran is unsafe. The executor (unlike Pool) raises
    # instead of hanging when a worker dies, e.g. killed for memory.
    ctx = multiprocessing.get_context("spawn")
    initargs = (tok.backend.to_str(), tok.eos_id, dtype, os.getpid())
    try:
        with ProcessPoolExecutor(workers, ctx, initializer=_worker_init, initargs=initargs) as pool:
            in_flight: deque = deque()
            for job in batches():
                in_flight.append(pool.submit(_worker_encode, job))
                while len(in_flight) > 2 * workers:  # bounded: the corpus never sits in memory
                    split, tokens, counts, nbytes = in_flight.popleft().result()
                    writers[split].add(tokens, counts, nbytes)
            while in_flight:
                split, tokens, counts, nbytes = in_flight.popleft().result()
                writers[split].add(tokens, counts, nbytes)
    except BrokenProcessPool as err:
        raise TestbedError(
            f"workers={workers}: a tokenising process died ({err}); finished shards are kept, so "
            "run the same command again, with fewer --workers if memory is short."
        ) from err
    bar.close()
    return tokenised


def _manifest(out, source, tok, plan, dtype, settings, settings_key, by_split, exact, shard_tokens) -> dict:
    splits = {}
    for s in SPLITS:
        recs = by_split[s]
        splits[s] = {
            "tokens": sum(r["tokens"] for r in recs),
            "bytes": sum(r["bytes"] for r in recs),
            "documents": sum(r["documents"] for r in recs),
            "token_bytes": sum(r["token_bytes"] for r in recs),
            "shards": len(recs),
        }
    shards = [r for s in SPLITS for r in by_split[s]]
    fingerprint = _key(settings_key, *(r["sha256"] for r in shards))
    return {
        "format": FORMAT_VERSION,
        "tokens": sum(v["tokens"] for v in splits.values()),
        "bytes": sum(v["bytes"] for v in splits.values()),
        "documents": sum(v["documents"] for v in splits.values()),
        "vocab_size": tok.vocab_size,
        "dtype": dtype,
        "eos_id": tok.eos_id,
        "splits": splits,
        "shards": shards,
        "shard_tokens": shard_tokens,
        # Exact bits per byte: token bytes of every split add up to its text bytes.
        "token_bytes_exact": bool(exact and all(v["token_bytes"] == v["bytes"] for v in splits.values())),
        "tokenizer": tok.describe(),
        "source": source.describe(),
        "split": plan.to_dict(),
        "non_utf8_replacements": source.non_utf8_replacements,
        "settings_key": settings_key,
        "fingerprint": fingerprint,
    }


# --------------------------------------------------------------------------- reading


def _reprepare(path: Path) -> str:
    return f"run `testbed data prepare --out {path}` again (into a new folder) to rebuild it"


def manifest_checksum(manifest: dict) -> str:
    """sha256 of a manifest's canonical JSON, its own `checksum` key left out."""
    body = {k: v for k, v in manifest.items() if k not in ("checksum", "_run")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest.json of a prepared folder, checked against its checksum: an edited or damaged
    manifest is an error naming it. (Manifests written before the checksum existed have none.)"""
    folder = Path(path)
    file = folder / "manifest.json"
    try:
        manifest = json.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise TestbedError(f"data.path={str(folder)!r} has no manifest.json; run `testbed data prepare "
                           f"--out` into it first.") from None
    except ValueError as err:
        raise TestbedError(f"{file} is not valid JSON ({err}); {_reprepare(folder)}.") from None
    if not isinstance(manifest, dict):
        raise TestbedError(f"{file} is not a JSON object; {_reprepare(folder)}.")
    if "checksum" in manifest and manifest["checksum"] != manifest_checksum(manifest):
        raise TestbedError(f"{file} does not match its checksum (edited or damaged); {_reprepare(folder)}.")
    return manifest


class TokenShards:
    """A prepared folder, memory-mapped.

    `verify`: "size" checks every shard's size; "cached" (default) also checks sha256, once per
    file version (size, mtime, inode remembered in .verified.json); "full" always hashes.
    """

    def __init__(self, path: str | os.PathLike, verify: str = "cached") -> None:
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.exists():
            hint = " (a prepare is still running or was killed; re-run it)" if (self.path / "progress.json").exists() else ""
            raise TestbedError(
                f"data.path={str(self.path)!r} has no manifest.json{hint}; run `testbed data "
                "prepare --out` into it first."
            )
        if verify not in ("size", "cached", "full"):
            raise ValueError(f"verify must be size, cached or full, not {verify!r}")
        self.manifest: dict = read_manifest(self.path)
        self.vocab_size: int = int(self.manifest["vocab_size"])
        self.eos_id: int = int(self.manifest["eos_id"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self._verify(verify)
        self._maps: dict[str, list[np.memmap]] = {s: [] for s in SPLITS}
        for rec in self.manifest["shards"]:
            self._maps[rec["split"]].append(np.memmap(self.path / rec["file"], dtype=self.dtype, mode="r"))
        self._offsets = {
            s: np.concatenate([[0], np.cumsum([len(m) for m in maps])]).astype(np.int64)
            for s, maps in self._maps.items()
        }
        self.token_bytes: np.ndarray = self._token_bytes()
        if len(self.token_bytes) < self.vocab_size:
            raise TestbedError(
                f"token_bytes.npy in {str(self.path)!r} has {len(self.token_bytes)} entries for a "
                f"vocabulary of {self.vocab_size}; {_reprepare(self.path)}."
            )

    def _token_bytes(self) -> np.ndarray:
        file = self.path / "token_bytes.npy"
        try:
            table = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            what = "is missing" if not file.exists() else f"is not a numpy array file ({err})"
            raise TestbedError(f"{file} {what}; {_reprepare(self.path)}.") from None
        if not isinstance(table, np.ndarray) or table.ndim != 1 or table.dtype.kind not in "iu":
            raise TestbedError(f"{file} does not hold a vector of integers; {_reprepare(self.path)}.")
        want = self.manifest.get("token_bytes_sha256")
        if want is not None and _sha256_file(file) != want:
            raise TestbedError(f"{file} does not match the sha256 in manifest.json (edited or corrupted); "
                               f"{_reprepare(self.path)}.")
        return table

    def _verify(self, mode: str) -> None:
        cache_path = self.path / ".verified.json"
        cache = {}
        if mode == "cached" and cache_path.exists():
            try:
                cache = json.loads(cache_path.read_text())
            except ValueError:
                cache = {}
        changed = False
        for rec in self.manifest["shards"]:
            file = self.path / rec["file"]
            if not file.exists():
                raise TestbedError(f"shard {str(file)!r} listed in manifest.json is missing; {_reprepare(self.path)}.")
            st = file.stat()
            want = rec["tokens"] * self.dtype.itemsize
            if st.st_size != want:
                raise TestbedError(
                    f"shard {str(file)!r} has {st.st_size} bytes but manifest.json says {want} "
                    f"(truncated or edited); {_reprepare(self.path)}."
                )
            if mode == "size":
                continue
            stamp = [st.st_size, st.st_mtime_ns, st.st_ino, rec["sha256"]]
            if mode == "cached" and cache.get(rec["file"]) == stamp:
                continue
            if _sha256_file(file) != rec["sha256"]:
                raise TestbedError(
                    f"shard {str(file)!r} does not match the sha256 in manifest.json (edited or "
                    f"corrupted); {_reprepare(self.path)}."
                )
            cache[rec["file"]] = stamp
            changed = True
        if mode == "cached" and changed:
            try:
                write_text_atomic(cache_path, json.dumps(cache))
            except OSError:
                pass  # a read-only folder just re-hashes next time

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")

    def num_tokens(self, split: str = "train") -> int:
        self._check_split(split)
        return int(self._offsets[split][-1])

    def num_windows(self, seq_len: int, split: str = "train") -> int:
        """Non-overlapping windows of seq_len+1 tokens in the split's concatenated stream."""
        return self.num_tokens(split) // (seq_len + 1)

    def _span(self, split: str, start: int, end: int) -> np.ndarray:
        offsets, maps = self._offsets[split], self._maps[split]
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        pieces, pos, i = [], start, first
        while pos < end:
            lo = pos - offsets[i]
            hi = min(end, offsets[i + 1]) - offsets[i]
            pieces.append(maps[i][lo:hi])
            pos = offsets[i] + hi
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def windows(self, indices: np.ndarray, seq_len: int, split: str = "train") -> np.ndarray:
        """int64 [n, seq_len+1]: window i is tokens [i*(seq_len+1), (i+1)*(seq_len+1))."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.num_windows(seq_len, split)
        if len(indices) and (indices.min() < 0 or indices.max() >= n):
            raise IndexError(f"window index out of range [0, {n}) for seq_len={seq_len}, split={split}")
        width = seq_len + 1
        out = np.empty((len(indices), width), dtype=np.int64)
        for row, idx in enumerate(indices):
            out[row] = self._span(split, int(idx) * width, int(idx) * width + width)
        return out

    def window_bytes(self, indices: np.ndarray, seq_len: int, split: str = "train") -> np.ndarray:
        """int64 [n]: UTF-8 bytes of each window's target tokens (tokens 1..seq_len)."""
        return self.token_bytes[self.windows(indices, seq_len, split)[:, 1:]].sum(axis=1)

    def tokens(self, split: str = "validation") -> np.ndarray:
        """The split's whole token stream (copied into memory), for whole-split evaluation."""
        self._check_split(split)
        maps = self._maps[split]
        return np.concatenate(maps) if maps else np.empty(0, dtype=self.dtype)

    def validation_bytes_total(self) -> int:
        """UTF-8 bytes of all validation text: the bits-per-byte denominator for the whole split."""
        return int(self.manifest["splits"]["validation"]["bytes"])

    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]
