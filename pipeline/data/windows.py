"""The units of one split across a run's stores: opened stores, the task's units, counts.

A unit is what the global order permutes: a fixed window of the token stream for pretraining,
a packed window of examples (``sft``) or one example (``seq2seq``); the task says which
(pipeline/tasks/base.py ``Task.units``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from zeroforge.data_prep.storage import StorageError, url_scheme
from zeroforge.data_prep.store import StoreError, TokenStore
from zeroforge.pipeline.data.config import DataConfig
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.tasks.base import Task


def open_stores(data: DataConfig) -> list[TokenStore]:
    """Every store of ``data`` (one, or a mixture's), opened; they must share a tokenizer and
    the same kind of examples."""
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
    kinds = {repr(s.examples) for s in stores}
    if len(kinds) > 1:
        raise ConfigError("data.mixture: the stores hold different kinds of examples (format "
                          f"or template): {sorted(s.examples_format for s in stores)}")
    return stores


def store_examples(stores: list[TokenStore]) -> dict[str, Any] | None:
    """The stores' ``examples`` description (the same for all, see ``open_stores``)."""
    return stores[0].examples


def store_fingerprint(stores: list[TokenStore]) -> str:
    """One store's fingerprint; a mixture's are joined with ``+``."""
    return "+".join(s.fingerprint for s in stores)


class SplitWindows:
    """Split ``split`` of every store, cut into ``task``'s units (``seed``: the packing)."""

    def __init__(self, data: DataConfig, stores: list[TokenStore], split: str, task: Task,
                 seed: int):
        self.data, self.task, self.layout = data, task, task.layout
        self.paths = [p for p, _ in data.sources()]
        self.weights = [w for _, w in data.sources()]
        self.stores = stores
        for i, s in enumerate(stores):
            if split not in s.splits:
                raise ConfigError(f"{data.source_key(i)}: store {self.paths[i]} has no {split!r} "
                                  "split")
            if s.examples_format not in task.store_formats:
                raise ConfigError(
                    f"{data.source_key(i)}: task {task.name} trains on "
                    f"{' or '.join(task.store_formats)} stores, {self.paths[i]} holds "
                    f"{s.examples_format} (zeroforge prep --format "
                    f"{task.store_formats[0]})")
        self.splits = [s.split(split) for s in stores]
        self.units = [task.units(sp, seed, j) for j, sp in enumerate(self.splits)]
        self.counts = [len(u) for u in self.units]
        self.dropped = [u.dropped for u in self.units]

    def windows(self, stores: np.ndarray, windows: np.ndarray) -> list[Any]:
        return [self.units[int(j)].get(int(w)) for j, w in zip(stores, windows, strict=True)]

    def lengths(self, stores: np.ndarray, windows: np.ndarray) -> np.ndarray:
        return np.asarray([self.units[int(j)].length(int(w))
                           for j, w in zip(stores, windows, strict=True)], dtype=np.int64)

    def prefetch(self, stores: np.ndarray, windows: np.ndarray) -> None:
        """Read-ahead hint: these units come soon (a remote store starts fetching them)."""
        for j, w in zip(stores.tolist(), windows.tolist(), strict=True):
            self.units[j].prefetch(w)

    def describe_dropped(self, split: str) -> str | None:
        """A log line about examples left out because they do not fit, or None."""
        if not any(self.dropped):
            return None
        layout = self.layout
        limit = (f"data.seq_len={layout.input_len} / data.target_len={layout.target_len}"
                 if layout.target_len else f"data.seq_len={layout.input_len}")
        return (f"{split}: {sum(self.dropped)} examples do not fit {limit} and are left out "
                f"({dict(zip(self.paths, self.dropped, strict=True))})")
