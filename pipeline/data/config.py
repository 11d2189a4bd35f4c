"""``data``: where the tokens come from and how examples are cut (YAML key ``data``)."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field
from zeroforge.data_prep.cache import CacheOptions
from zeroforge.data_prep.locations import location_problem
from zeroforge.pipeline.section import Section


class DataConfig(Section):
    KEY: ClassVar[str] = "data"

    store: str | None = None  # token store path (single store)
    mixture: list[dict] = Field(default_factory=list)  # [{"store": path, "weight": w}, ...]
    seq_len: int = 256  # GPT context length / T5 encoder input length (seq2seq: longest source)
    target_len: int = 128  # seq2seq: longest target (with its EOT); longer examples are left out
    # gpt: attention within documents only, positions restarting at each EOT (sft always does)
    document_mask: bool = False
    noise_density: float = 0.15  # T5 span corruption: fraction of raw tokens masked
    mean_span_length: float = 3.0  # T5 span corruption: mean noise span length
    prefetch: int = 4  # micro-batches prepared ahead by the background thread
    val_windows: int = 64  # fixed validation windows (at most; capped by the val split)
    # Stores on object storage (s3://): where their chunks are cached on this node, how much,
    # and how many steps ahead the loader asks for the chunks the global order needs next.
    cache_dir: str | None = None  # default $ZEROFORGE_CACHE_DIR, else ~/.cache/zeroforge/...
    cache_gb: float | None = None  # default $ZEROFORGE_CACHE_GB, else 16
    readahead_steps: int = 8

    def problems(self) -> list[str]:
        problems = []
        if (self.store is None) == (not self.mixture):
            problems.append("data.store or data.mixture must be set (exactly one of them)")
        for i, entry in enumerate(self.mixture):
            key = f"data.mixture[{i}]"
            unknown = sorted(set(entry) - {"store", "weight"})
            if unknown:
                problems.append(f"{key} must only have keys store, weight (got {unknown})")
            if not isinstance(entry.get("store"), str) or not entry.get("store"):
                problems.append(f"{key}.store must be a token store path")
            elif location_problem(entry["store"], f"{key}.store"):
                problems.append(location_problem(entry["store"], f"{key}.store"))
            weight = entry.get("weight")
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not (math.isfinite(weight) and weight > 0)
            ):
                problems.append(f"{key}.weight must be a positive number, got {weight!r}")
        if self.store is not None and location_problem(self.store, "data.store"):
            problems.append(location_problem(self.store, "data.store"))
        if self.seq_len < 2:
            problems.append(f"data.seq_len must be at least 2, got {self.seq_len}")
        if self.target_len < 1:
            problems.append(f"data.target_len must be at least 1, got {self.target_len}")
        if not 0.0 < self.noise_density < 1.0:
            problems.append(f"data.noise_density must be in (0, 1), got {self.noise_density}")
        if not self.mean_span_length >= 1.0:
            problems.append(f"data.mean_span_length must be >= 1, got {self.mean_span_length}")
        if self.prefetch < 1:
            problems.append(f"data.prefetch must be at least 1, got {self.prefetch}")
        if self.val_windows < 0:
            problems.append(f"data.val_windows must be >= 0, got {self.val_windows}")
        if self.cache_gb is not None and not self.cache_gb > 0:
            problems.append(f"data.cache_gb must be positive, got {self.cache_gb}")
        if self.readahead_steps < 0:
            problems.append(f"data.readahead_steps must be >= 0, got {self.readahead_steps}")
        return problems

    def sources(self) -> list[tuple[str, float]]:
        """(store path, weight) for every store; a single store has weight 1."""
        if self.store is not None:
            return [(self.store, 1.0)]
        return [(str(e["store"]), float(e["weight"])) for e in self.mixture]

    def cache(self) -> CacheOptions:
        """Where remote stores' chunks are cached (data_prep/cache.py)."""
        return CacheOptions(dir=self.cache_dir, gb=self.cache_gb)

    def source_key(self, i: int) -> str:
        """The config key that names store ``i`` (for messages)."""
        return "data.store" if self.store is not None else f"data.mixture[{i}].store"
