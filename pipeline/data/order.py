"""The global sample order: a pure function of ``(seed, sample index)``.

Because of it the loader state is one integer (global samples consumed), and a resume with a
different number of ranks continues the same order. See docs/data-loading.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

_FEISTEL_ROUNDS = 6
_U64 = 0xFFFFFFFFFFFFFFFF


def feistel_key(seed: int, store: int, epoch: int) -> list[int]:
    """Round keys of the permutation of ``store``'s units in ``epoch`` (packing.py uses a
    pseudo-epoch of its own)."""
    seq = np.random.SeedSequence([seed & _U64, store, epoch])
    return seq.generate_state(_FEISTEL_ROUNDS, dtype=np.uint64).tolist()


def mixture_counts(weights: Sequence[float], total: int) -> list[int]:
    """Largest-remainder rounding of ``total * w_j / sum(w)``; sums to ``total`` exactly.

    Exact rational arithmetic, so the counts never depend on float summation order. Ties in
    the remainder go to the earlier store.
    """
    fracs = [Fraction(w) for w in weights]
    quotas = [total * f / sum(fracs) for f in fracs]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda j: (-(quotas[j] - counts[j]), j))
    for j in by_remainder[: total - sum(counts)]:
        counts[j] += 1
    return counts


class FeistelPermutation:
    """A keyed pseudo-random bijection of [0, n), computed pointwise in O(1) memory.

    A balanced Feistel network permutes [0, 4^h) for the smallest 4^h >= n; values that land
    outside [0, n) are encrypted again (cycle walking), which keeps the map a bijection of
    [0, n) and costs fewer than 4 rounds-trips on average. A materialised permutation of 1e9
    windows would take 8 GB per epoch; this takes nothing.
    """

    def __init__(self, n: int, key: Sequence[int]):
        assert n >= 1
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.n = n
        self.keys = [np.uint64(k) for k in key]

    def _round_fn(self, r: np.ndarray, k: np.uint64) -> np.ndarray:
        # splitmix64 finaliser: a cheap, well-mixed 64-bit hash (uint64 array ops wrap mod 2^64)
        x = r + k
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))) & self.mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for k in self.keys:
            left, right = right, left ^ self._round_fn(right, k)
        return (left << np.uint64(self.half)) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        x = self._encrypt(np.asarray(index, dtype=np.uint64))
        outside = x >= np.uint64(self.n)
        while outside.any():
            x[outside] = self._encrypt(x[outside])
            outside = x >= np.uint64(self.n)
        return x.astype(np.int64)


class GlobalOrder:
    """Maps global sample index -> (store, window): a pure function of the seed and the index.

    Global batch b (samples ``[b*G, (b+1)*G)``) takes ``counts[j]`` samples from store j, namely
    samples ``[b*counts[j], (b+1)*counts[j])`` of that store's own stream; store sample s is
    window ``perm_{seed, j, s // n_j}(s % n_j)`` (each store wraps its epochs independently).
    Inside a batch the stores are spread evenly by a fixed pattern, so every micro-batch and
    every rank sees roughly the mixture proportions. With one store this reduces to
    "sample g is window perm_{seed, epoch}(g % n) with epoch = g // n", whatever G is.
    """

    def __init__(self, windows_per_epoch: Sequence[int], counts: Sequence[int], seed: int):
        assert len(windows_per_epoch) == len(counts) and all(n > 0 for n in windows_per_epoch)
        self.windows_per_epoch = [int(n) for n in windows_per_epoch]
        self.counts = [int(c) for c in counts]
        self.global_batch = sum(self.counts)
        self.seed = seed
        # Smooth weighted round-robin: the q-th sample of store j sits at key (q + 0.5) / c_j.
        keys = [
            (Fraction(2 * q + 1, 2 * c), j, q) for j, c in enumerate(self.counts) for q in range(c)
        ]
        keys.sort()
        self._pattern_store = np.array([j for _, j, _ in keys], dtype=np.int64)
        self._pattern_q = np.array([q for _, _, q in keys], dtype=np.int64)
        self._perms: dict[tuple[int, int], FeistelPermutation] = {}

    def _perm(self, store: int, epoch: int) -> FeistelPermutation:
        perm = self._perms.get((store, epoch))
        if perm is None:  # building one is cheap; the cache only saves the key derivation
            if len(self._perms) > 64:  # epochs only move forward; keep the cache small
                self._perms = {}
            perm = FeistelPermutation(self.windows_per_epoch[store],
                                      feistel_key(self.seed, store, epoch))
            self._perms[(store, epoch)] = perm
        return perm

    def store_samples(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(store index, sample index within that store's stream) of global samples ``g``."""
        g = np.asarray(g, dtype=np.int64)
        if len(self.counts) == 1:
            return np.zeros_like(g), g
        batch, pos = np.divmod(g, self.global_batch)
        store = self._pattern_store[pos]
        counts = np.asarray(self.counts, dtype=np.int64)
        return store, batch * counts[store] + self._pattern_q[pos]

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(store index, store epoch, window index) of global samples ``g``."""
        store, s = self.store_samples(g)
        n = np.asarray(self.windows_per_epoch, dtype=np.int64)[store]
        epoch, i = np.divmod(s, n)
        window = np.empty_like(i)
        for j, e in set(zip(store.tolist(), epoch.tolist(), strict=True)):
            sel = (store == j) & (epoch == e)
            window[sel] = self._perm(j, e)(i[sel])
        return store, epoch, window

    def store_epochs(self, samples: int) -> list[int]:
        """Epoch each store's stream is in after ``samples`` global samples (a batch boundary)."""
        if len(self.counts) == 1:
            return [samples // self.windows_per_epoch[0]]
        batches = samples // self.global_batch
        return [batches * c // n for c, n in zip(self.counts, self.windows_per_epoch, strict=True)]
