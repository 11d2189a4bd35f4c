"""Packing whole examples into fixed windows: a deterministic bin-packing pass.

The examples of a split are shuffled by a keyed Feistel permutation (order.py; the key comes
from the seed and the store), cut into buffers of ``BUFFER`` examples in that order, and each
buffer is packed on its own by first-fit decreasing: the longest example goes first into the
first window with room, a new window opens when none has. A buffer keeps memory and the sort
local; first-fit decreasing leaves at most a few percent of a window empty on realistic length
mixes (benchmarks/packing.py). No example is ever split: an example either fits a window whole
or is left out (counted).

The windows are a pure function of (lengths, capacity, seed, store), the same on every rank and
in every run, so the global order permutes them like any other unit and exact resume and
world-size independence hold as for fixed windows. The packing is done once per run: every
epoch permutes the same windows (a new order each epoch, the same neighbours inside a window).
"""

from __future__ import annotations

import numpy as np
from zeroforge.pipeline.data.order import FeistelPermutation, feistel_key

BUFFER = 4096  # examples packed together
# The shuffle before packing is keyed like an epoch's permutation, with an epoch number that no
# run reaches, so it never coincides with one.
PACK_EPOCH = 1 << 62


def first_fit_decreasing(sizes: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of indices into ``sizes``) by first-fit decreasing; every size <= capacity.

    A max-tree over the bins' free room finds the leftmost bin with room in O(log n): bins
    not yet opened have the whole capacity free, so the leftmost fit is an open bin or the next
    new one.
    """
    assert len(sizes) == 0 or int(sizes.max()) <= capacity
    n = len(sizes)
    leaves = 1 << max(1, (max(n, 1) - 1).bit_length())
    free = [capacity] * (2 * leaves)
    bins: list[list[int]] = []
    for i in np.argsort(-sizes, kind="stable").tolist():
        size = int(sizes[i])
        node = 1
        while node < leaves:  # descend to the leftmost leaf with room
            node = 2 * node if free[2 * node] >= size else 2 * node + 1
        b = node - leaves
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[node] -= size
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def pack(sizes: np.ndarray, capacity: int, seed: int, store: int) -> list[np.ndarray]:
    """Windows of example indices (into ``sizes``) for one split; see the module docstring.
    Examples larger than ``capacity`` must have been removed by the caller."""
    n = len(sizes)
    if n == 0:
        return []
    perm = FeistelPermutation(n, feistel_key(seed, store, PACK_EPOCH))
    shuffled = perm(np.arange(n, dtype=np.int64))
    windows: list[np.ndarray] = []
    for a in range(0, n, BUFFER):
        ids = shuffled[a:a + BUFFER]
        for b in first_fit_decreasing(sizes[ids], capacity):
            windows.append(ids[np.asarray(b, dtype=np.int64)])
    return windows
