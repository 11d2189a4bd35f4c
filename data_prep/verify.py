"""Full verification of a token store: every checksum and every invariant.

A fine-tuning store (version 2) also has its loss mask checked: its CRC-32, values 0/1, and
per example: the first token (prompt or source) carries no loss, the final EOT carries loss,
and (pairs) the mask is 0...0 1...1, one source followed by one target.
"""

from __future__ import annotations

import numpy as np

from .cache import CacheOptions
from .checksum import crc32
from .storage import StorageError
from .store import LOSS_MASK, StoreError, TokenStore


def verify_store(path: str) -> list[str]:
    """Problems found, each naming its split and array; empty when the store is sound.

    A remote store is read once, shard by shard (one GET per shard), through a memory-only
    cache: a full pass must not push training's chunks out of the shared disk cache."""
    try:
        store = TokenStore.open(path, cache=CacheOptions(disk=False))
    except (StoreError, StorageError) as exc:
        return [str(exc)]
    problems: list[str] = []
    for name in store.splits:
        try:
            problems += _verify_split(store, name)
        except (StoreError, StorageError) as exc:
            problems.append(str(exc))
    store.close()
    return problems


def _verify_split(store: TokenStore, name: str) -> list[str]:
    split = store.split(name)
    where = f"{store.path}/{name}"
    offsets = split.doc_offsets  # checks its own checksum and length
    problems = []
    if offsets[0] != 0:
        problems.append(f"{where}/doc_offsets: starts at {offsets[0]}, not 0")
    if len(offsets) > 1 and np.any(np.diff(offsets) <= 0):
        i = int(np.argmax(np.diff(offsets) <= 0))
        problems.append(f"{where}/doc_offsets: not increasing at document {i}")
    if offsets[-1] != split.n_tokens:
        problems.append(f"{where}/doc_offsets: last offset {offsets[-1]} != {split.n_tokens} tokens")
    if problems:
        return problems
    crc, block = 0, store.layout.shard_tokens
    doc_ends = offsets[1:] - 1
    mask_check = _MaskCheck(store, name, offsets) if split.has_loss_mask else None
    for a in range(0, split.n_tokens, block):
        b = min(a + block, split.n_tokens)
        tokens = split.tokens(a, b)  # checks every inner chunk's CRC-32C on the way
        crc = crc32(tokens, crc)
        if len(tokens) and int(tokens.max()) >= store.vocab_size:
            bad = a + int(np.argmax(tokens >= store.vocab_size))
            problems.append(f"{where}/tokens: id {int(tokens[bad - a])} at {bad} >= vocab size {store.vocab_size}")
        ends = doc_ends[(doc_ends >= a) & (doc_ends < b)]
        not_eot = ends[tokens[ends - a] != store.eot_id]
        if len(not_eot):
            doc = int(np.searchsorted(doc_ends, not_eot[0]))
            problems.append(f"{where}: document {doc} does not end with EOT ({store.eot_id})")
        if mask_check is not None:
            mask_check.block(a, split.loss_mask(a, b))
    if f"{crc:08x}" != store.attrs["checksums"][name]["tokens"]:
        problems.append(f"{where}/tokens: checksum mismatch (crc32 {crc:08x}, expected {store.attrs['checksums'][name]['tokens']})")
    if mask_check is not None:
        problems += mask_check.finish()
    return problems


class _MaskCheck:
    """The loss-mask invariants, block by block in stream order."""

    def __init__(self, store: TokenStore, split: str, offsets: np.ndarray):
        self.where = f"{store.path}/{split}/{LOSS_MASK}"
        self.expected_crc = store.attrs["checksums"][split].get(LOSS_MASK)
        self.expected_count = int(store.attrs["counts"][split].get("loss_tokens", -1))
        self.pairs = store.examples_format == "pairs"
        self.starts, self.ends = offsets[:-1], offsets[1:] - 1
        self.crc, self.count, self.previous = 0, 0, None
        self.problems: list[str] = []

    def _fault(self, what: str, positions: np.ndarray, at_doc: np.ndarray) -> None:
        doc = int(np.searchsorted(at_doc, positions[0], side="right")) - 1
        self.problems.append(f"{self.where}: {what} (example {max(doc, 0)}, token "
                             f"{int(positions[0])})")

    def block(self, a: int, mask: np.ndarray) -> None:
        self.crc = crc32(mask, self.crc)
        self.count += int(mask.sum(dtype=np.int64))
        if len(self.problems) > 10:  # enough to name the fault; CRC and count still cover all
            return
        b = a + len(mask)
        if len(mask) and int(mask.max()) > 1:
            self._fault("values other than 0 and 1", a + np.nonzero(mask > 1)[0], self.starts)
        starts = self.starts[(self.starts >= a) & (self.starts < b)]
        if len(bad := starts[mask[starts - a] != 0]):
            self._fault("the first token of an example carries loss", bad, self.starts)
        ends = self.ends[(self.ends >= a) & (self.ends < b)]
        if len(bad := ends[mask[ends - a] != 1]):
            self._fault("an example's final EOT carries no loss", bad, self.starts)
        if self.pairs:  # a fall from 1 to 0 may only happen where the next example starts
            joined = mask if self.previous is None else np.concatenate(([self.previous], mask))
            first = a if self.previous is None else a - 1
            falls = first + 1 + np.nonzero(joined[1:] < joined[:-1])[0]
            if len(bad := falls[~np.isin(falls, self.starts)]):
                self._fault("a pair's mask is not source (0) then target (1)", bad, self.starts)
        if len(mask):
            self.previous = mask[-1]

    def finish(self) -> list[str]:
        if self.expected_crc is not None and f"{self.crc:08x}" != self.expected_crc:
            self.problems.append(f"{self.where}: checksum mismatch (crc32 {self.crc:08x}, "
                                 f"expected {self.expected_crc})")
        if self.count != self.expected_count:
            self.problems.append(f"{self.where}: {self.count} loss tokens, the store's counts "
                                 f"say {self.expected_count}")
        return self.problems
