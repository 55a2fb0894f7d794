"""Tokenisation throughput of `testbed data prepare` against a plain `tokenizers` loop.

Trains (or takes from the cache) a byte-level BPE tokenizer on the source, then times, in one
process and on the same text:
  * plain:      `Tokenizer.encode_batch` over ~1 MB batches, one thread, texts already in memory;
  * prepare/1:  the whole tokenising pass of `prepare` with one process (read, split, encode,
                write shards, hash them);
  * prepare/2:  the same with two worker processes.
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

    def best_of(fn, repeats=2):
        return min(_timed(fn) for _ in range(repeats))

    plain_s = best_of(lambda: [tok.backend.encode_batch(b, add_special_tokens=False) for b in batches])
    fast_s = best_of(lambda: [tok.backend.encode_batch_fast(b, add_special_tokens=False) for b in batches])
    results = {
        "source": args.source, "bytes": total, "documents": len(docs), "vocab_size": args.vocab_size,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s)",
        "tokenizer_train_or_cache_s": round(train_s, 2),
        "plain_encode_batch_MBps": round(total / plain_s / 1e6, 3),
        "plain_encode_batch_fast_MBps": round(total / fast_s / 1e6, 3),
        "prepare": {},
    }
    for workers in args.workers:
        runs = []
        for _ in range(2):
            with tempfile.TemporaryDirectory() as out:
                m = prepare(source, out, vocab_size=args.vocab_size, workers=workers,
                            cache_dir=args.cache_dir)
                runs.append(m["_run"]["seconds"])
        mbps = m["bytes"] / min(runs) / 1e6
        results["prepare"][str(workers)] = {
            "MBps": round(mbps, 3),
            "per_process_vs_plain": round(mbps / workers / results["plain_encode_batch_MBps"], 3),
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
