"""Tokenisation throughput of `testbed data prepare` against a plain `tokenizers` loop.

Trains (or takes from the cache) a byte-level BPE tokenizer on the source, then times, in one
process and on the same text:
  * plain:      `Tokenizer.encode_batch` over ~1 MB batches, one thread, texts already in memory;
  * prepare/1:  a whole `prepare` call with one process, tokenizer and split already cached
                (read, split, encode, write shards, hash them, write the manifest);
  * prepare/2:  the same with two worker processes (their start-up included).
Throughput is UTF-8 megabytes of document text per second. The target is prepare/N >= 0.8 x
plain x N ("per process").

    python scripts/bench_tokenize.py --source /work/shared/data/python-docs-3.11.jsonl --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

DEFAULT_SOURCE = "/work/shared/data/python-docs-3.11.jsonl"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=DEFAULT_SOURCE, help="corpus to tokenise (file, folder, glob)")
    p.add_argument("--vocab-size", type=int, default=16384, help="BPE vocabulary size (default: 16384)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="process counts to time")
    p.add_argument("--cache-dir", default=None, help="tokenizer cache root (default: $TESTBED_CACHE or ~/.cache/testbed)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best is kept (default: 3)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the plain loop gets one core, like a worker
    from testbed.data.shards import BATCH_BYTES, prepare
    from testbed.data.sources import open_source
    from testbed.data.tokenizer import train_tokenizers

    source = open_source(args.source)
    t0 = time.perf_counter()
    tok = train_tokenizers(source, [args.vocab_size], cache_dir=args.cache_dir)[args.vocab_size]
    train_s = time.perf_counter() - t0

    docs = list(source.iter_texts())
    total = sum(len(d.encode("utf-8")) for d in docs)
    batches, batch, held = [], [], 0
    for d in docs:
        batch.append(d)
        held += len(d.encode("utf-8"))
        if held >= BATCH_BYTES:
            batches.append(batch)
            batch, held = [], 0
    if batch:
        batches.append(batch)

    def plain():
        for b in batches:
            tok.backend.encode_batch(b, add_special_tokens=False)

    def plain_fast():
        for b in batches:
            tok.backend.encode_batch_fast(b, add_special_tokens=False)

    def prepare_with(workers):
        def run():
            with tempfile.TemporaryDirectory() as out:
                prepare(source, out, vocab_size=args.vocab_size, workers=workers, cache_dir=args.cache_dir)
        return run

    # Rounds interleave the variants so that load from other processes hits them alike; the
    # best round of each is reported. prepare is timed whole (pool start-up included), with the
    # tokenizer and the split already cached.
    variants = {"plain": plain, "plain_fast": plain_fast}
    variants.update({f"prepare_{w}": prepare_with(w) for w in args.workers})
    best = {name: float("inf") for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            best[name] = min(best[name], _timed(fn))
    mbps = {name: total / s / 1e6 for name, s in best.items()}
    results = {
        "source": args.source, "bytes": total, "documents": len(docs), "vocab_size": args.vocab_size,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s)",
        "rounds": args.rounds,
        "tokenizer_train_or_cache_s": round(train_s, 2),
        "plain_encode_batch_MBps": round(mbps["plain"], 3),
        "plain_encode_batch_fast_MBps": round(mbps["plain_fast"], 3),
        "prepare": {
            str(w): {
                "MBps": round(mbps[f"prepare_{w}"], 3),
                "per_process_vs_plain": round(mbps[f"prepare_{w}"] / w / mbps["plain"], 3),
            }
            for w in args.workers
        },
    }
    source.close()
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    return 0


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
