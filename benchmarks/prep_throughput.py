"""Prep throughput vs raw tiktoken over the same documents, same process count, same run.

    python benchmarks/prep_throughput.py [--input builtin:stdlib ...] [--workers 1 2]

Baseline: the documents already in memory, split into the same ~1 MB batches, encoded by
`encode_ordinary_batch` in N processes (a spawn Pool). Ours: `zeroforge prep` end to end with N
workers — reading files, tokenizing, routing, writing the Zarr store, committing, verifying
nothing. Prints MB/s and tokens/s for both and the ratio ours / raw (target >= 0.85).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path

from zeroforge.data_prep.build import PrepOptions, build_store
from zeroforge.data_prep.sources import SourceOptions, expand_inputs, read_records
from zeroforge.data_prep.tokenize import get_encoding

_enc = None


def _init() -> None:
    global _enc
    _enc = get_encoding("gpt2")


def _encode(texts: list[str]) -> int:
    return sum(len(x) + 1 for x in _enc.encode_ordinary_batch(texts, num_threads=1))


def _batches(texts: list[str], batch_chars: int = 1 << 20) -> list[list[str]]:
    out, cur, n = [], [], 0
    for t in texts:
        cur.append(t)
        n += len(t)
        if n >= batch_chars:
            out.append(cur)
            cur, n = [], 0
    return out + ([cur] if cur else [])


def raw_tiktoken(texts: list[str], workers: int) -> tuple[float, int]:
    batches = _batches(texts)
    if workers == 1:
        _init()
        t0 = time.perf_counter()
        tokens = sum(_encode(b) for b in batches)
        return time.perf_counter() - t0, tokens
    with mp.get_context("spawn").Pool(workers, initializer=_init) as pool:
        pool.map(_encode, [["warm up"]] * workers)  # start-up is not tokenization
        t0 = time.perf_counter()
        tokens = sum(pool.imap(_encode, batches))
        return time.perf_counter() - t0, tokens


def ours(inputs: list[str], workers: int, work: Path) -> tuple[float, int]:
    out = work / f"store-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    attrs = build_store(inputs, out, PrepOptions(workers=workers, progress=False))
    return time.perf_counter() - t0, sum(c["tokens"] for c in attrs["counts"].values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", default=["builtin:stdlib"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each side")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    texts = [r.text for r in read_records(expand_inputs(args.input), SourceOptions()) if r.skip is None]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    work = Path(tempfile.mkdtemp(prefix="zf-bench-prep-"))
    print(f"corpus {' '.join(args.input)}: {len(texts):,} documents, {mb:.1f} MB")
    print(f"{'workers':>7} {'raw MB/s':>9} {'prep MB/s':>10} {'raw tok/s':>10} {'prep tok/s':>11} {'ratio':>6}")
    for w in args.workers:
        raw_t, raw_n = min(raw_tiktoken(texts, w) for _ in range(args.repeats))
        our_t, our_n = min(ours(args.input, w, work) for _ in range(args.repeats))
        assert raw_n == our_n, (raw_n, our_n)
        print(f"{w:>7} {mb / raw_t:>9.2f} {mb / our_t:>10.2f} {raw_n / raw_t:>10.0f} {our_n / our_t:>11.0f} {raw_t / our_t:>6.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
