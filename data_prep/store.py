"""The token store: layout, creation, and the reader that training uses.

Layout (docs/token-store.md has the full description):

    STORE/zarr.json             root group; attributes describe the store (see `describe`)
    STORE/<split>/tokens        1-D uint16|uint32, the split's documents back to back
    STORE/<split>/doc_offsets   1-D int64, n_docs + 1, from 0; doc i = tokens[off[i]:off[i+1]]
    STORE/<split>/loss_mask     1-D uint8 aligned with tokens (version 2: fine-tuning examples);
                                1 on the tokens that carry loss (responses, targets, each EOT)

Version 1 stores hold text; version 2 stores hold fine-tuning examples (`--format sft|pairs`)
and describe them in the `examples` attribute. Text stores are still written as version 1, so
a text build is byte-identical to one made before version 2 existed; the reader reads both.

Both arrays use Zarr's sharding codec: a shard (one file) holds many inner chunks, each chunk
followed by its CRC-32C, and an index (with its own CRC-32C) at the end of the shard.

A split's logical token stream may be stored in several *segments*: a multi-part build moves
each part's shard files into place without copying, so each part starts on a shard boundary of
the physical array. `segments` maps logical ranges to physical ones; a single build has one.

The reader does not go through zarr (its generic indexing costs ~1 ms a window): shards.py
reads the sharding layout itself, from a local directory or S3 alike (storage.py).
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from zarr.codecs import Crc32cCodec, ZstdCodec

from .cache import CacheOptions
from .checksum import crc32
from .locations import open_storage
from .shards import ArrayReader, StoreError
from .storage import ObjectMissing, Storage, StorageError

FORMAT_NAME = "zeroforge-token-store"
TEXT_FORMAT_VERSION = 1  # documents only
EXAMPLES_FORMAT_VERSION = 2  # + loss_mask, counts.loss_tokens, checksums.loss_mask, examples
FORMAT_VERSIONS = (TEXT_FORMAT_VERSION, EXAMPLES_FORMAT_VERSION)
SPLITS = ("train", "val")
LOSS_MASK = "loss_mask"
CODECS = ("none", "zstd")
FETCH_THREADS = 16  # concurrent ranged GETs of a remote store's read-ahead

__all__ = ["StoreError", "TokenStore", "SplitReader", "Layout", "describe", "create_split_arrays"]


@dataclass(frozen=True)
class Layout:
    """How the arrays are cut into shards and chunks (elements, not bytes)."""

    shard_tokens: int = 16 * 2**20  # 32 MiB of uint16: tens of MB per file
    chunk_tokens: int = 64 * 2**10  # 128 KiB: ~64 windows of 1025 tokens per chunk
    offsets_shard: int = 4 * 2**20  # 32 MiB of int64
    offsets_chunk: int = 64 * 2**10
    codec: str = "none"  # measured in benchmarks/store_read.py: see docs/token-store.md

    def validate(self) -> list[str]:
        problems = []
        for name in ("shard_tokens", "chunk_tokens", "offsets_shard", "offsets_chunk"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive")
        if self.shard_tokens % max(self.chunk_tokens, 1):
            problems.append("--shard-tokens must be a multiple of --chunk-tokens")
        if self.offsets_shard % max(self.offsets_chunk, 1):
            problems.append("offsets shard must be a multiple of its chunk")
        if self.codec not in CODECS:
            problems.append(f"--codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        return problems


def _compressors(codec: str) -> list:
    # CRC-32C per inner chunk: a flipped byte is caught on read, and names its chunk.
    return [Crc32cCodec()] if codec == "none" else [ZstdCodec(level=3), Crc32cCodec()]


def create_split_arrays(group, split: str, dtype: np.dtype, layout: Layout,
                        loss_mask: bool = False) -> None:
    """Empty `tokens` and `doc_offsets` arrays (and `loss_mask`, sharded like the tokens so a
    multi-part build moves its shards the same way) for one split inside an open zarr group."""
    sub = group.require_group(split)
    common = {"fill_value": 0, "config": {"write_empty_chunks": True}, "overwrite": True}
    sub.create_array(
        "tokens",
        shape=(0,),
        dtype=dtype,
        chunks=(layout.chunk_tokens,),
        shards=(layout.shard_tokens,),
        compressors=_compressors(layout.codec),
        **common,
    )
    sub.create_array(
        "doc_offsets",
        shape=(0,),
        dtype=np.int64,
        chunks=(layout.offsets_chunk,),
        shards=(layout.offsets_shard,),
        compressors=_compressors(layout.codec),
        **common,
    )
    if loss_mask:
        sub.create_array(
            LOSS_MASK,
            shape=(0,),
            dtype=np.uint8,
            chunks=(layout.chunk_tokens,),
            shards=(layout.shard_tokens,),
            compressors=_compressors(layout.codec),
            **common,
        )


_live_readers: weakref.WeakSet = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [r._after_fork() for r in list(_live_readers)])


class SplitReader:
    """Random access to one split: `tokens(a, b)`, `loss_mask(a, b)` (version 2), `doc(i)`,
    sizes, read-ahead hints."""

    def __init__(self, store: TokenStore, name: str):
        self.store, self.name = store, name
        info = store.attrs["counts"][name]
        self.n_tokens: int = int(info["tokens"])
        self.n_docs: int = int(info["docs"])
        self.segments = [tuple(int(x) for x in s) for s in store.attrs["segments"][name]]
        layout = store.layout
        self._tokens = store.array(f"{name}/tokens", layout.shard_tokens, layout.chunk_tokens,
                                   store.dtype)
        self._offsets = store.array(f"{name}/doc_offsets", layout.offsets_shard,
                                    layout.offsets_chunk, np.dtype(np.int64))
        self.has_loss_mask = store.examples is not None
        self.n_loss_tokens: int = int(info.get("loss_tokens", 0))
        # Sharded like the tokens (element i is token i's mask), read by the same shard reader.
        self._mask = store.array(f"{name}/{LOSS_MASK}", layout.shard_tokens, layout.chunk_tokens,
                                 np.dtype(np.uint8)) if self.has_loss_mask else None
        self._identity = len(self.segments) <= 1 and all(lg == ph for lg, ph, _ in self.segments)
        _live_readers.add(self)

    def __len__(self) -> int:
        return self.n_tokens

    @cached_property
    def doc_offsets(self) -> np.ndarray:
        where = f"{self.store.path}/{self.name}/doc_offsets"
        if self.n_docs == 0:
            # [0] alone is all fill value, and zarr stores no chunk for that: nothing to read.
            offsets = np.zeros(1, dtype=np.int64)
        else:
            self._offsets.require(0, self.n_docs + 1)
            offsets = self._offsets.read(0, self.n_docs + 1)
        expected = self.store.attrs["checksums"][self.name]["doc_offsets"]
        if f"{crc32(offsets):08x}" != expected:
            raise StoreError(f"{where}: checksum mismatch")
        return offsets

    def doc(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} out of range for split {self.name} ({self.n_docs} docs)")
        off = self.doc_offsets
        return self.tokens(int(off[i]), int(off[i + 1]))

    def _physical_ranges(self, a: int, b: int) -> list[tuple[int, int]]:
        if self._identity:  # single build: logical == physical
            return [(a, b)]
        out = []
        for logical, physical, length in self.segments:
            lo, hi = max(a, logical), min(b, logical + length)
            if lo < hi:
                out.append((physical + lo - logical, physical + hi - logical))
        return out

    def tokens(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the logical stream (a copy)."""
        return self._logical(self._tokens, "tokens", a, b)

    def loss_mask(self, a: int, b: int) -> np.ndarray:
        """uint8 loss mask of tokens [a, b) (a copy): 1 where the token carries loss. Only
        version-2 stores (fine-tuning examples) have one."""
        if self._mask is None:
            raise StoreError(f"{self.store.path}: a text store has no loss mask; build it with "
                             "`zeroforge prep --format sft|pairs`")
        return self._logical(self._mask, LOSS_MASK, a, b)

    def _logical(self, array: ArrayReader, name: str, a: int, b: int) -> np.ndarray:
        """Elements [a, b) of the logical stream of ``array`` (tokens or loss_mask), mapped
        through the segments."""
        if not 0 <= a <= b <= self.n_tokens:
            raise IndexError(f"{name}[{a}:{b}] out of range for split {self.name} ({self.n_tokens} tokens)")
        parts = [array.read(pa, pb) for pa, pb in self._physical_ranges(a, b)]
        if not parts:
            return np.empty(0, dtype=array.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _arrays(self) -> list[ArrayReader]:
        """The arrays aligned with the token stream: tokens, and the loss mask if any."""
        return [self._tokens] if self._mask is None else [self._tokens, self._mask]

    def prefetch(self, a: int, b: int) -> None:
        """Hint that tokens [a, b) (and their loss mask) will be read soon: a remote store
        starts fetching their chunks in the background; a local one needs nothing."""
        for pa, pb in self._physical_ranges(max(a, 0), min(b, self.n_tokens)):
            for array in self._arrays():
                array.prefetch(pa, pb)

    def _after_fork(self) -> None:
        for array in (*self._arrays(), self._offsets):
            array.after_fork()

    def check_shards(self) -> None:
        """Load every shard index that referenced tokens (and their loss-mask bytes) need:
        missing shards or chunks raise."""
        for _, physical, length in self.segments:
            if length:
                for array in self._arrays():
                    array.require(physical, physical + length)


class TokenStore:
    """An open, complete token store. `TokenStore.open(location)` refuses anything else."""

    def __init__(self, storage: Storage, attrs: dict[str, Any], cache: CacheOptions):
        self.storage, self.attrs = storage, attrs
        self.path: str = storage.location
        self.local = not storage.remote
        tok = attrs["tokenizer"]
        self.tokenizer: str = tok["name"]
        self.vocab_size: int = int(tok["vocab_size"])
        self.eot_id: int = int(tok["eot_id"])
        self.dtype = np.dtype(attrs["dtype"])
        self.layout = Layout(**attrs["layout"])
        self.splits: tuple[str, ...] = tuple(attrs["counts"])
        self.format_version = int(attrs["format_version"])
        # Version 2: how the examples were made (examples.ExampleOptions.describe); None: text.
        self.examples: dict[str, Any] | None = attrs.get("examples")
        self._readers: dict[str, SplitReader] = {}
        self._cache = None if self.local else cache.open(f"{self.path}\0{self.fingerprint}")
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        _live_readers.add(self)

    @classmethod
    def open(cls, location: str | os.PathLike, check_shards: bool = True,
             cache: CacheOptions | None = None) -> TokenStore:
        """Open a complete store at a local path or s3://BUCKET/PREFIX. ``cache`` says where
        a remote store's chunks are cached (default: the environment, see cache.py)."""
        try:
            storage = open_storage(location)
            store = cls._open(storage, cache or CacheOptions())
            layout = store.layout
            for name in store.splits:
                _require_group(storage, name)
                split = store.split(name)
                end = max((p + n for _, p, n in split.segments), default=0)
                for array in ("tokens", LOSS_MASK) if split.has_loss_mask else ("tokens",):
                    shape = _array_shape(storage, f"{name}/{array}", layout.shard_tokens,
                                         layout.chunk_tokens)
                    if shape < end:
                        raise StoreError(f"{store.path}/{name}/{array}: {shape} elements "
                                         f"stored, segments need {end}")
                # The offsets' metadata too: a damaged store is named at open, not mid-run.
                _array_shape(storage, f"{name}/doc_offsets", layout.offsets_shard,
                             layout.offsets_chunk)
                if check_shards:
                    split.check_shards()
        except StorageError as exc:
            raise StoreError(str(exc)) from None
        return store

    @classmethod
    def _open(cls, storage: Storage, cache: CacheOptions) -> TokenStore:
        path = storage.location
        try:
            meta = json.loads(storage.read("zarr.json"))
        except ObjectMissing:
            raise StoreError(f"{path}: not a token store (no zarr.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path}/zarr.json: not valid JSON ({exc})") from None
        attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{path}: not a {FORMAT_NAME} (format={attrs.get('format')!r})")
        if attrs.get("format_version") not in FORMAT_VERSIONS:
            raise StoreError(f"{path}: format version {attrs.get('format_version')} is not supported (this zeroforge reads {', '.join(map(str, FORMAT_VERSIONS))})")
        if attrs["format_version"] == EXAMPLES_FORMAT_VERSION and not isinstance(attrs.get("examples"), dict):
            raise StoreError(f"{path}: a version-2 store without its `examples` attribute")
        if not attrs.get("complete"):
            raise StoreError(f"{path}: the build did not complete; rerun the same `zeroforge prep` command to finish it")
        return cls(storage, attrs, cache)

    def array(self, key: str, shard_len: int, chunk_len: int, dtype: np.dtype) -> ArrayReader:
        return ArrayReader(self.storage, key, shard_len, chunk_len, dtype, self.layout.codec,
                           f"{self.path}/{key}", self._cache, self._executor)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="zeroforge-fetch")
            return self._pool

    def _after_fork(self) -> None:
        # Threads do not survive a fork; the child starts its own pool when it needs one.
        self._pool, self._pool_lock = None, threading.Lock()

    def split(self, name: str) -> SplitReader:
        if name not in self.splits:
            raise KeyError(f"{self.path}: no split {name!r} (has {', '.join(self.splits)})")
        if name not in self._readers:
            self._readers[name] = SplitReader(self, name)
        return self._readers[name]

    @property
    def examples_format(self) -> str:
        """``text``, ``sft`` or ``pairs``."""
        return "text" if self.examples is None else str(self.examples["format"])

    @property
    def fingerprint(self) -> str:
        """Content id: changes whenever any token, document boundary or prep setting changes."""
        return f"{self.attrs['prep_config_hash'][:16]}-" + "-".join(
            self.attrs["checksums"][s]["tokens"] for s in self.splits
        )

    def close(self) -> None:
        """Wait for background fetches and stop their threads (reading later starts new ones)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _array_shape(storage: Storage, key: str, shard_len: int, chunk_len: int) -> int:
    """The stored length of a 1-D array, after checking its zarr metadata matches the layout."""
    where = f"{storage.location}/{key}"
    try:
        meta = json.loads(storage.read(f"{key}/zarr.json"))
        (shape,) = meta["shape"]
        (shard,) = meta["chunk_grid"]["configuration"]["chunk_shape"]
        sharding = meta["codecs"][0]
        (chunk,) = sharding["configuration"]["chunk_shape"]
    except ObjectMissing:
        raise StoreError(f"{where}/zarr.json: missing (the metadata of array {key!r})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError,
            ValueError) as exc:
        raise StoreError(f"{where}/zarr.json: not the metadata of a token store array ({exc!r})") from None
    if sharding.get("name") != "sharding_indexed" or (shard, chunk) != (shard_len, chunk_len):
        raise StoreError(f"{where}/zarr.json: shards of {shard} and chunks of {chunk} do not match "
                         f"the store layout ({shard_len}, {chunk_len})")
    return int(shape)


def _require_group(storage: Storage, split: str) -> None:
    """The split's group metadata exists (zarr readers need it): name the file if it is not."""
    if not storage.exists(f"{split}/zarr.json"):
        raise StoreError(f"{storage.location}/{split}/zarr.json: missing (the metadata of split "
                         f"{split!r})")


def describe(store: TokenStore) -> dict[str, Any]:
    """What `zeroforge inspect` shows."""
    size = sum(store.storage.list("").values())
    return {
        "path": store.path,
        "format": f"{FORMAT_NAME} v{store.format_version}",
        "examples": store.examples,
        "tokenizer": store.attrs["tokenizer"],
        "dtype": store.attrs["dtype"],
        "splits": store.attrs["counts"],
        "skipped": store.attrs["skipped"],
        "sources": store.attrs["sources"],
        "layout": store.attrs["layout"],
        "size_bytes": size,
        "fingerprint": store.fingerprint,
    }
