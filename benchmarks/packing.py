"""Packing efficiency of the sft task against one example per row (not a test).

For a length distribution it reports, per strategy, the share of window tokens that are not
padding and the share that carry loss:

- packed: zeroforge's packing (pipeline/data/packing.py: shuffled, first-fit decreasing in
  buffers of 4096 examples, no example split), windows of seq_len positions;
- one per row, padded to seq_len: the plain alternative;
- one per row, padded to the longest in a batch of 8 (dynamic padding), the usual better
  baseline.

Distributions: the builtin `builtin:pydoc-qa` SFT store (real, short) and a synthetic chat-like
one (log-normal lengths, median 300 tokens, a long tail up to the window; prompts a third).

    python benchmarks/packing.py [--seq-len 1024] [--examples 50000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from zeroforge.data_prep.build import PrepOptions, build_store
from zeroforge.data_prep.examples import ExampleOptions
from zeroforge.data_prep.store import TokenStore
from zeroforge.pipeline.data.examples import ExampleSpans
from zeroforge.pipeline.data.packing import pack


def synthetic(n: int, seq_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(positions per example = tokens - 1, loss tokens per example) of a chat-like mix."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(300), 0.8, size=n).astype(np.int64), 8, seq_len + 1)
    prompt = np.maximum(1, (lengths * rng.uniform(0.1, 0.6, size=n)).astype(np.int64))
    return lengths - 1, lengths - prompt


def pydoc_qa(seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s"
        build_store(["builtin:pydoc-qa"], out, PrepOptions(
            progress=False, examples=ExampleOptions(format="sft", template="chat")))
        spans = ExampleSpans(TokenStore.open(out).split("train"))
        return spans.lengths - 1, spans.loss_tokens()


def report(name: str, positions: np.ndarray, loss: np.ndarray, seq_len: int) -> None:
    keep = positions <= seq_len
    positions, loss = positions[keep], loss[keep]
    # A target is loss-bearing where its token is: the first token of an example is never a
    # target, and it is a prompt token, so the loss tokens of an example are all targets.
    t0 = time.perf_counter()
    windows = pack(positions, seq_len, seed=0, store=0)
    dt = time.perf_counter() - t0
    packed_total = len(windows) * seq_len
    rows = [("packed (zeroforge)", packed_total)]
    rows.append(("one per row, padded to seq_len", len(positions) * seq_len))
    order = np.random.default_rng(1).permutation(len(positions))
    batches = [positions[order[a:a + 8]] for a in range(0, len(order), 8)]
    rows.append(("one per row, padded to batch max (8)", sum(len(b) * b.max() for b in batches)))
    print(f"\n{name}: {len(positions):,} examples, seq_len {seq_len}, mean {positions.mean():.0f} "
          f"positions, {int((~keep).sum())} longer than the window left out; packing "
          f"{dt:.2f} s ({len(windows):,} windows)")
    print("| strategy | window tokens | non-pad | loss-bearing | vs packed |")
    print("|---|---|---|---|---|")
    for label, total in rows:
        print(f"| {label} | {total:,} | {positions.sum() / total:.1%} | {loss.sum() / total:.1%} "
              f"| {total / packed_total:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--examples", type=int, default=50_000)
    args = p.parse_args()
    positions, loss = synthetic(args.examples, args.seq_len)
    report("synthetic chat-like (log-normal)", positions, loss, args.seq_len)
    positions, loss = pydoc_qa(args.seq_len)
    report("builtin:pydoc-qa", positions, loss, min(args.seq_len, 256))


if __name__ == "__main__":
    main()
