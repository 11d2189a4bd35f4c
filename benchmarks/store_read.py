"""Random-window reads: the token store reader vs np.memmap over the same tokens, same run.

    python benchmarks/store_read.py [--store DIR] [--windows 20000]

Builds a store from CPython's standard library source (~30 MB of .py files; no download) with
each codec, writes the same train tokens to a flat .bin, and times random windows of 1025 and
2049 tokens through: np.memmap (baseline), the store reader, and zarr's generic indexing.
Prints windows/s and the ratio reader / memmap (target >= 0.5) plus the size on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
from zeroforge.data_prep.build import PrepOptions, build_store
from zeroforge.data_prep.store import Layout, TokenStore


def _rate(read, starts: np.ndarray, length: int) -> float:
    t0 = time.perf_counter()
    for s in starts:
        read(int(s), int(s) + length)
    return len(starts) / (time.perf_counter() - t0)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default="builtin:stdlib")
    ap.add_argument("--windows", type=int, default=20000)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="zf-bench-read-"))
    rng = np.random.default_rng(0)
    print(f"{'codec':<6} {'window':>6} {'memmap/s':>10} {'reader/s':>10} {'ratio':>6} {'zarr/s':>8} {'MB':>7}")
    for codec in ("none", "zstd"):
        out = work / f"store-{codec}"
        opts = PrepOptions(layout=dataclasses.replace(Layout(), codec=codec), workers=2, progress=False)
        build_store([args.input], out, opts)
        split = TokenStore.open(out).split("train")
        flat = work / "tokens.bin"
        if not flat.exists():
            split.tokens(0, split.n_tokens).tofile(flat)
        mm = np.memmap(flat, dtype=split.store.dtype, mode="r")
        zarr_tokens = split._arrays["tokens"]
        for length in (1025, 2049):
            starts = rng.integers(0, split.n_tokens - length, args.windows)
            split.tokens(0, split.n_tokens)  # first touch verifies every chunk once: not timed
            base = _rate(lambda a, b, mm=mm: np.array(mm[a:b]), starts, length)
            ours = _rate(split.tokens, starts, length)
            generic = _rate(lambda a, b, z=zarr_tokens: z[a:b], starts[:300], length)
            print(
                f"{codec:<6} {length:>6} {base:>10.0f} {ours:>10.0f} {ours / base:>6.2f} "
                f"{generic:>8.0f} {_dir_size(out) / 1e6:>7.1f}"
            )
    print(f"train tokens: {split.n_tokens:,}; flat uint16 file: {flat.stat().st_size / 1e6:.1f} MB; work dir {work}")


if __name__ == "__main__":
    main()
