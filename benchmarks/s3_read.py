"""Token stores on S3: the reader against the local reader, bytes fetched, and a 2-rank run's
data wait, all against a local S3 server (moto) in the same run.

    python benchmarks/s3_read.py [--input builtin:stdlib] [--windows 20000] [--steps 40]

1. Builds the store locally and copies its objects into a bucket (the same bytes).
2. Random windows of 1,025 tokens: the local reader, then the S3 reader with a warm cache
   (ratio, target >= 0.5).
3. Bytes fetched / bytes of the windows read (target <= 1.1) from a cold cache:
   - one epoch of windows in a random order, the way training reads a split;
   - a few thousand random windows only (the bound is (chunk + window) / window: a window
     costs its inner chunks, which are what the CRC-32C covers).
4. A 2-rank gpt2-tiny-cpu run from the S3 store with a cold cache, and the same run from the
   local store: data wait per step (`train/data_wait_s`, rank 0) against the step time
   (target < 5%).

Shards default to 1 Mi tokens (2 MiB objects) because moto copies the whole object on every
GET: a 32 MiB shard costs it ~30 ms a request, which real S3 does not charge. The inner chunks
are the default 64 Ki tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.helpers: the S3 server

from zeroforge.data_prep.build import PrepOptions, build_store  # noqa: E402
from zeroforge.data_prep.cache import CacheOptions  # noqa: E402
from zeroforge.data_prep.locations import open_storage  # noqa: E402
from zeroforge.data_prep.store import Layout, TokenStore  # noqa: E402
from zeroforge.pipeline.tracking.metrics_file import read_metrics  # noqa: E402

from tests.helpers.s3_server import running_s3_server  # noqa: E402

WINDOW = 1025


def _rate(split, starts: np.ndarray) -> float:
    t0 = time.perf_counter()
    for s in starts:
        split.tokens(int(s), int(s) + WINDOW)
    return len(starts) / (time.perf_counter() - t0)


def _fetched(store: TokenStore, read) -> tuple[int, int, float]:
    storage = store.storage
    b0, g0, t0 = storage.bytes_fetched, storage.gets, time.perf_counter()
    read()
    return storage.bytes_fetched - b0, storage.gets - g0, time.perf_counter() - t0


def _train(store: str, run_dir: Path, steps: int, env: dict[str, str]) -> dict:
    cmd = [str(Path(sys.executable).with_name("zeroforge")), "train", "--config", "gpt2-tiny-cpu",
           "--nproc", "2", f"data.store={store}", f"run_dir={run_dir}",
           f"train.max_steps={steps}", "train.eval_every=0", "train.sample_tokens=0",
           "checkpoint.every=0", "data.val_windows=0", f"data.cache_dir={run_dir / 'cache'}"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode:
        raise SystemExit(f"training from {store} failed:\n{p.stderr[-3000:]}")
    rows = [r for r in read_metrics(run_dir) if "train/data_wait_s" in r]
    tokens_per_step = None
    waits, steps_s = [], []
    for r in rows:
        waits.append(r["train/data_wait_s"])
        if tokens_per_step is None:
            tokens_per_step = r["train/tokens"] / r["step"]
        steps_s.append(tokens_per_step / r["train/tokens_per_s"])
    waits, steps_s = np.array(waits), np.array(steps_s)
    return {"steps": len(rows), "step_s": float(np.median(steps_s)),
            "wait_mean_s": float(waits.mean()), "wait_max_s": float(waits.max()),
            "wait_share": float(waits.sum() / steps_s.sum()), "first_wait_s": float(waits[0]),
            "loss": [r["train/loss"] for r in rows]}


def _reads(url: str, here, work: Path, args, rng) -> None:
    """Bytes fetched from a cold cache, then warm-cache windows/s against the local reader."""
    n = here.n_tokens
    # Bytes fetched, cold cache: one epoch in a random order; then sparse windows.
    cold = TokenStore.open(url, cache=CacheOptions(dir=str(work / "cache-epoch"), gb=10))
    starts = rng.permutation(n // (WINDOW - 1)) * (WINDOW - 1)
    starts = starts[starts + WINDOW <= n]
    split = cold.split("train")
    fetched, gets, dt = _fetched(cold, lambda: [split.tokens(int(s), int(s) + WINDOW)
                                                for s in starts])
    read = len(starts) * WINDOW * 2
    print(f"cold, one epoch ({len(starts):,} windows, random order): fetched "
          f"{fetched / 1e6:.1f} MB in {gets:,} GETs for {read / 1e6:.1f} MB of windows: "
          f"ratio {fetched / read:.3f}; {len(starts) / dt:,.0f} windows/s")
    sparse = TokenStore.open(url, cache=CacheOptions(dir=str(work / "cache-sparse"), gb=10))
    few = rng.integers(0, n - WINDOW, args.sparse)
    ssplit = sparse.split("train")
    fetched, gets, dt = _fetched(sparse, lambda: [ssplit.tokens(int(s), int(s) + WINDOW)
                                                  for s in few])
    read = len(few) * WINDOW * 2
    print(f"cold, {len(few):,} random windows: fetched {fetched / 1e6:.1f} MB in {gets:,} GETs "
          f"for {read / 1e6:.1f} MB of windows: ratio {fetched / read:.2f}")

    # Warm cache vs the local reader.
    here.tokens(0, n)  # first touch checks every chunk once: not timed
    split.tokens(0, n)
    print(f"{'reader':<24} {'windows/s':>10}")
    for rnd in range(3):
        starts = rng.integers(0, n - WINDOW, args.windows)
        base, ours = _rate(here, starts), _rate(split, starts)
        print(f"{'local':<24} {base:>10,.0f}\n{'s3, warm cache':<24} {ours:>10,.0f}   "
              f"ratio {ours / base:.2f} (round {rnd + 1})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default="builtin:stdlib")
    ap.add_argument("--windows", type=int, default=20000)
    ap.add_argument("--sparse", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--shard-tokens", type=int, default=2**20)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-reads", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="zf-bench-s3-"))
    local = work / "store"
    if not (local / "zarr.json").exists():
        layout = dataclasses.replace(Layout(), shard_tokens=args.shard_tokens)
        build_store([args.input], local, PrepOptions(layout=layout, val_fraction=0.01, workers=2,
                                                     progress=False))
    rng = np.random.default_rng(0)
    with running_s3_server(work) as server:
        os.environ.update(server.env)
        url = server.new_bucket() + "/store"
        remote_storage = open_storage(url)
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            remote_storage.write(f.relative_to(local).as_posix(), f.read_bytes())
        here = TokenStore.open(local).split("train")
        n = here.n_tokens
        print(f"store: {n:,} train tokens, {sum(1 for _ in local.rglob('c/*'))} shard objects, "
              f"shards of {args.shard_tokens:,} tokens, chunks of {Layout().chunk_tokens:,}")

        if not args.skip_reads:
            _reads(url, here, work, args, rng)
        if not args.skip_train:
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
            results = {}
            for name, store in (("local", str(local)), ("s3 (cold cache)", url)):
                run_dir = work / f"run-{name.split()[0]}"
                shutil.rmtree(run_dir, ignore_errors=True)
                results[name] = _train(store, run_dir, args.steps, env)
            for name, r in results.items():
                print(f"2-rank gpt2-tiny-cpu from {name}: {r['steps']} steps, median step "
                      f"{r['step_s'] * 1e3:.0f} ms, data wait mean {r['wait_mean_s'] * 1e3:.1f} ms "
                      f"(first step {r['first_wait_s'] * 1e3:.0f} ms, max "
                      f"{r['wait_max_s'] * 1e3:.0f} ms) = {100 * r['wait_share']:.2f}% of step time")
            same = results["local"]["loss"] == results["s3 (cold cache)"]["loss"]
            print(f"losses bitwise equal: {same}")
        print(json.dumps({"workdir": str(work)}))


if __name__ == "__main__":
    main()
