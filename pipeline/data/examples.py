"""The units of fine-tuning stores (format version 2, docs/token-store.md): whole examples.

An example of a split is a document of the store: its tokens, and the loss mask over them (1 on
the response / target tokens and on the final EOT). ``PackedUnits`` packs examples into windows
for decoder-only fine-tuning (``sft``); ``PairUnits`` keeps one example per unit for the
encoder-decoder (``seq2seq``). Examples that cannot fit the run's lengths are left out and
counted in ``dropped``: an example is never cut.
"""

from __future__ import annotations

import numpy as np
from zeroforge.data_prep.store import SplitReader
from zeroforge.pipeline.data.packing import pack

Example = tuple[np.ndarray, np.ndarray]  # (tokens, loss mask), aligned


class ExampleSpans:
    """Where each example of a split lies, and reading one."""

    def __init__(self, split: SplitReader) -> None:
        self.split = split
        offsets = split.doc_offsets
        self.starts, self.lengths = offsets[:-1], np.diff(offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def read(self, i: int) -> Example:
        a, b = int(self.starts[i]), int(self.starts[i] + self.lengths[i])
        return self.split.tokens(a, b), self.split.loss_mask(a, b)

    def prefetch(self, i: int) -> None:
        """Read-ahead hint for example ``i`` (its tokens and loss mask)."""
        a = int(self.starts[i])
        self.split.prefetch(a, a + int(self.lengths[i]))

    def loss_tokens(self) -> np.ndarray:
        """Loss tokens of every example (targets with their EOT), read a block at a time."""
        out = np.zeros(len(self), dtype=np.int64)
        block = self.split.store.layout.shard_tokens
        ends = self.starts + self.lengths
        for a in range(0, self.split.n_tokens, block):
            b = min(a + block, self.split.n_tokens)
            # Prefix sums of the block's mask: an example's share is a difference of two.
            sums = np.concatenate(([0], np.cumsum(self.split.loss_mask(a, b), dtype=np.int64)))
            first = int(np.searchsorted(ends, a, side="right"))  # first example ending after a
            last = int(np.searchsorted(self.starts, b, side="left"))  # examples starting before b
            lo = np.clip(self.starts[first:last], a, b) - a
            hi = np.clip(ends[first:last], a, b) - a
            out[first:last] += sums[hi] - sums[lo]
        return out


class PackedUnits:
    """Windows of whole examples for decoder-only fine-tuning (packing.py).

    An example of ``L`` tokens feeds ``L - 1`` positions (its tokens but the last as inputs,
    all but the first as targets), so a window holds examples whose ``L - 1`` add up to at most
    ``capacity`` (``data.seq_len``).
    """

    def __init__(self, split: SplitReader, capacity: int, seed: int, store: int) -> None:
        self.spans = ExampleSpans(split)
        self.sizes = self.spans.lengths - 1
        fits = np.nonzero(self.sizes <= capacity)[0]
        self.dropped = len(self.sizes) - len(fits)
        self.bins = [fits[b] for b in pack(self.sizes[fits], capacity, seed, store)]

    def __len__(self) -> int:
        return len(self.bins)

    def get(self, i: int) -> list[Example]:
        return [self.spans.read(int(e)) for e in self.bins[i]]

    def prefetch(self, i: int) -> None:
        for e in self.bins[i]:
            self.spans.prefetch(int(e))

    def length(self, i: int) -> int:
        return int(self.sizes[self.bins[i]].sum())


class PairUnits:
    """One source/target example per unit (encoder-decoder): the examples whose source fits
    ``max_source`` encoder tokens and whose target (with its EOT) ``max_target`` decoder tokens."""

    def __init__(self, split: SplitReader, max_source: int, max_target: int) -> None:
        self.spans = ExampleSpans(split)
        target = self.spans.loss_tokens()
        source = self.spans.lengths - target
        self.examples = np.nonzero((source <= max_source) & (target <= max_target))[0]
        self.dropped = len(self.spans) - len(self.examples)
        self.lengths = (source + target)[self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def get(self, i: int) -> Example:
        return self.spans.read(int(self.examples[i]))

    def prefetch(self, i: int) -> None:
        self.spans.prefetch(int(self.examples[i]))

    def length(self, i: int) -> int:
        return int(self.lengths[i])
