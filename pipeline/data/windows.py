"""The windows of one split across a run's stores: opened stores, the task's geometry, counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from zeroforge.data_prep.storage import StorageError, url_scheme
from zeroforge.data_prep.store import StoreError, TokenStore
from zeroforge.pipeline.data.config import DataConfig
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.tasks.base import Layout


def open_stores(data: DataConfig) -> list[TokenStore]:
    """Every store of ``data`` (one, or a mixture's), opened; they must share a tokenizer."""
    problems = data.problems()
    if problems:
        raise ConfigError("; ".join(problems))
    paths = [p for p, _ in data.sources()]
    for i, path in enumerate(paths):
        if url_scheme(path) is None and not Path(path).exists():
            raise ConfigError(f"{data.source_key(i)}: no token store at {path}")
    stores = []
    for i, path in enumerate(paths):
        try:
            stores.append(TokenStore.open(path, cache=data.cache()))
        except (StoreError, StorageError) as exc:
            raise StoreError(f"{data.source_key(i)}: {exc}") from None
    tokenizers = {(s.tokenizer, s.vocab_size, s.eot_id) for s in stores}
    if len(tokenizers) > 1:
        raise ConfigError(f"data.mixture: stores use different tokenizers {sorted(tokenizers)}")
    return stores


def store_fingerprint(stores: list[TokenStore]) -> str:
    """One store's fingerprint; a mixture's are joined with ``+``."""
    return "+".join(s.fingerprint for s in stores)


class SplitWindows:
    """Split ``split`` of every store, cut into ``layout``'s windows."""

    def __init__(self, data: DataConfig, stores: list[TokenStore], split: str, layout: Layout):
        self.data, self.layout = data, layout
        self.paths = [p for p, _ in data.sources()]
        self.weights = [w for _, w in data.sources()]
        self.stores = stores
        for i, s in enumerate(stores):
            if split not in s.splits:
                raise ConfigError(f"{data.source_key(i)}: store {self.paths[i]} has no {split!r} "
                                  "split")
        self.splits = [s.split(split) for s in stores]
        self.counts = [layout.windows(sp.n_tokens) for sp in self.splits]

    def tokens(self, store: int, window: int) -> np.ndarray:
        start = window * self.layout.stride
        return self.splits[store].tokens(start, start + self.layout.read_len)

    def windows(self, stores: np.ndarray, windows: np.ndarray) -> list[np.ndarray]:
        return [self.tokens(int(j), int(w)) for j, w in zip(stores, windows, strict=True)]

    def prefetch(self, stores: np.ndarray, windows: np.ndarray) -> None:
        """Read-ahead hint: these windows come soon (a remote store starts fetching them)."""
        for j, w in zip(stores.tolist(), windows.tolist(), strict=True):
            start = w * self.layout.stride
            self.splits[j].prefetch(start, start + self.layout.read_len)
