"""Full verification of a token store: every checksum and every invariant."""

from __future__ import annotations

import numpy as np

from .cache import CacheOptions
from .checksum import crc32
from .storage import StorageError
from .store import StoreError, TokenStore


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
    if f"{crc:08x}" != store.attrs["checksums"][name]["tokens"]:
        problems.append(f"{where}/tokens: checksum mismatch (crc32 {crc:08x}, expected {store.attrs['checksums'][name]['tokens']})")
    return problems
