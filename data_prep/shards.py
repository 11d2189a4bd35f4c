"""One sharded array of a token store (a split's `tokens` or `doc_offsets`), read through
`Storage`: the format half of the reader, shared by local and remote stores.

Zarr's sharding layout: a shard object holds the inner chunks back to back, each chunk's bytes
followed by their CRC-32C, and ends with an index of (offset, nbytes) little-endian uint64
pairs, one per chunk (2**64-1 for a chunk that was never written), followed by the index's own
CRC-32C. Zarr's generic indexing costs ~1 ms a window; this reader loads each shard's index
once and touches only the chunks a read needs, checking each chunk's CRC-32C the first time.

Where the bytes come from is the only difference between local and remote stores:

- local: the shard file is mapped read-only (as cheap as np.memmap; the page cache is shared
  by every process reading the store);
- remote (S3): the index is one ranged GET of the object's tail, and chunks are ranged GETs of
  just the chunks a read or a read-ahead hint needs (adjacent ones coalesced into one GET),
  kept in the local chunk cache (cache.py). `prefetch` fetches in background threads, so the
  loader can ask for what the global order needs next before it needs it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from typing import Any

import google_crc32c
import numpy as np
import zstandard

from .cache import ChunkCache
from .storage import ObjectMissing, Storage, StorageError

MISSING = 2**64 - 1  # shard-index entry of an absent chunk
CRC_BYTES = 4
# Checked chunks a reader keeps at hand (views of maps, or of the cache's buffers), in bytes.
MAX_HOT_BYTES = 256 * 2**20


class StoreError(ValueError):
    """A token store that must not be read: incomplete, corrupt, or not a token store."""


def check_crc32c(data: bytes, what: str) -> None:
    """``data`` is payload + its CRC-32C (little-endian)."""
    if google_crc32c.value(data[:-CRC_BYTES]) != int.from_bytes(data[-CRC_BYTES:], "little"):
        raise StoreError(f"{what}: checksum mismatch (data corrupted)")


class _Shard:
    def __init__(self, index: np.ndarray, mapped: Any | None):
        self.index = index
        self.mapped = mapped  # local: the whole shard file, mapped
        self.verified = np.zeros(len(index), dtype=bool)
        self.decoded: dict[int, np.ndarray] = {}  # zstd: a few decoded chunks


class ArrayReader:
    """Physical elements [a, b) of one sharded 1-D array."""

    def __init__(self, storage: Storage, key: str, shard_len: int, chunk_len: int,
                 dtype: np.dtype, codec: str, label: str, cache: ChunkCache | None,
                 pool: Callable[[], Executor] | None):
        self.storage, self.key, self.label = storage, key, label
        self.shard_len, self.chunk_len = shard_len, chunk_len
        self.dtype, self.codec = np.dtype(dtype), codec
        self.n_chunks = shard_len // chunk_len
        self.index_size = self.n_chunks * 16 + CRC_BYTES
        self.remote = storage.remote
        self.cache, self._pool = cache, pool
        self._reset()

    def _reset(self) -> None:
        self._shards: dict[int, _Shard] = {}
        self._sizes: dict[str, int] | None = None  # remote: shard object sizes, one LIST
        self._lock = threading.Lock()
        self._opening: dict[int, threading.Lock] = {}
        self._inflight: dict[tuple[int, int], Future] = {}
        # Checked chunks this process can read at once: (buffer, offset of the chunk in it).
        self._hot: dict[tuple[int, int], tuple[Any, int]] = {}
        self._hot_bytes = 0

    def after_fork(self) -> None:
        # A forked child (e.g. a DataLoader worker) must not share locks, threads or maps' state.
        self._reset()

    # -- shards and their indexes -----------------------------------------------------------
    def shard(self, k: int) -> _Shard:
        s = self._shards.get(k)
        if s is not None:
            return s
        with self._lock:  # one lock per shard: indexes of different shards load in parallel
            opening = self._opening.setdefault(k, threading.Lock())
        with opening:
            s = self._shards.get(k)
            if s is None:
                s = self._open_shard(k)
                self._shards[k] = s
        return s

    def _shard_label(self, k: int) -> str:
        return f"{self.label} shard c/{k}"

    def _open_shard(self, k: int) -> _Shard:
        key, label = f"{self.key}/c/{k}", self._shard_label(k)
        if not self.remote:
            try:
                mapped = self.storage.mapped(key)
            except ObjectMissing:
                raise StoreError(f"{label}: shard file is missing ({self.storage.url(key)})") from None
            except StorageError:
                raise StoreError(f"{label}: shard file is truncated (0 bytes)") from None
            if len(mapped) < self.index_size:
                raise StoreError(f"{label}: shard file is truncated ({len(mapped)} bytes)")
            return _Shard(self._parse_index(mapped[len(mapped) - self.index_size:], label), mapped)
        size = self._object_sizes().get(key)
        if size is None:
            raise StoreError(f"{label}: shard object is missing ({self.storage.url(key)})")
        if size < self.index_size:
            raise StoreError(f"{label}: shard object is truncated ({size} bytes)")
        cache_key = f"{self.key}/{k}/index"
        cached = self.cache.get(cache_key) if self.cache is not None else None
        index = None
        if cached is not None:
            try:
                index = self._parse_index(bytes(cached), label)
            except StoreError:
                self.cache.drop(cache_key)  # a bad cache file: fetch the index again
        if index is None:
            raw = self.storage.read_range(key, size - self.index_size, self.index_size)
            index = self._parse_index(raw, label)
            cached = None
        present = index[:, 0] != MISSING
        if present.any() and int((index[:, 0] + index[:, 1])[present].max()) > size - self.index_size:
            raise StoreError(f"{label}: shard object is truncated ({size} bytes)")
        if cached is None and self.cache is not None:
            self.cache.put(cache_key, raw)
        return _Shard(index, None)

    def _parse_index(self, raw: bytes, label: str) -> np.ndarray:
        check_crc32c(raw, f"{label}: shard index")
        return np.frombuffer(raw[:-CRC_BYTES], dtype="<u8").reshape(self.n_chunks, 2)

    def _object_sizes(self) -> dict[str, int]:
        if self._sizes is None:
            with self._lock:
                if self._sizes is None:
                    self._sizes = self.storage.list(f"{self.key}/c/")
        return self._sizes

    def require(self, a: int, b: int) -> None:
        """Every chunk holding elements [a, b) is present (zarr would return zeros for it)."""
        runs = list(self._chunk_runs(a, b))
        if self.remote and self._pool is not None and len(runs) > 1:
            # One ranged GET per shard index, many in flight (a store may have thousands).
            for _ in self._pool().map(self.shard, [k for k, _, _ in runs]):
                pass
        for k, c0, c1 in runs:
            index = self.shard(k).index
            missing = np.nonzero(index[c0:c1 + 1, 0] == MISSING)[0]
            if len(missing):
                raise StoreError(f"{self._shard_label(k)}: chunk {c0 + int(missing[0])} is missing")

    def _chunk_runs(self, a: int, b: int) -> Iterator[tuple[int, int, int]]:
        """(shard, first chunk, last chunk) of every shard that [a, b) touches."""
        if a >= b:
            return
        for k in range(a // self.shard_len, (b - 1) // self.shard_len + 1):
            lo, hi = max(a, k * self.shard_len), min(b, (k + 1) * self.shard_len)
            yield (k, (lo - k * self.shard_len) // self.chunk_len,
                   (hi - 1 - k * self.shard_len) // self.chunk_len)

    # -- reads ------------------------------------------------------------------------------
    def read(self, a: int, b: int) -> np.ndarray:
        """Elements [a, b), a writable copy."""
        out, pos = [], a
        while pos < b:
            k, within = divmod(pos, self.shard_len)
            c, start = divmod(within, self.chunk_len)
            stop = min(self.chunk_len, start + (b - pos))
            out.append(self._elements(k, c, start, stop, b - pos))
            pos += stop - start
        if len(out) == 1:
            return out[0].copy()  # frombuffer views are read-only
        return np.concatenate(out) if out else np.empty(0, dtype=self.dtype)

    def _elements(self, k: int, c: int, start: int, stop: int, left: int) -> np.ndarray:
        if self.codec == "none":
            hot = self._hot.get((k, c))
            if hot is None:  # first touch in this process: check it (and fetch it, remote)
                hot = self._load(k, c, start, left)
            buf, base = hot
            return np.frombuffer(buf, dtype=self.dtype, count=stop - start,
                                 offset=base + start * self.dtype.itemsize)
        shard = self._shards.get(k) or self.shard(k)
        chunk = shard.decoded.get(c)
        if chunk is None:
            buf, base = self._load(k, c, start, left)
            n = int(shard.index[c, 1])
            payload = bytes(buf[base:base + n - CRC_BYTES])
            chunk = np.frombuffer(zstandard.ZstdDecompressor().decompress(payload), dtype=self.dtype)
            if len(shard.decoded) >= 8:  # a few decoded chunks: windows often share one
                shard.decoded.pop(next(iter(shard.decoded)))
            shard.decoded[c] = chunk
        return chunk[start:stop]

    def _load(self, k: int, c: int, start: int, left: int) -> tuple[Any, int]:
        """Chunk c of shard k, checked, for the read of ``left`` elements from ``start`` in it:
        a remote read first fetches every missing chunk of the rest of the read, coalesced."""
        if self.remote:
            a = k * self.shard_len + c * self.chunk_len + start
            self._ensure(a, a + left)
        shard = self._shards.get(k) or self.shard(k)
        hot = self._chunk_bytes(shard, k, c)
        self._hot_bytes += int(shard.index[c, 1])
        if self._hot_bytes > MAX_HOT_BYTES:  # forget them all: re-adding one is a dict lookup
            self._hot, self._hot_bytes = {}, int(shard.index[c, 1])
        self._hot[(k, c)] = hot
        return hot

    def _chunk_bytes(self, shard: _Shard, k: int, c: int) -> tuple[Any, int]:
        """(buffer, offset of chunk c's bytes in it), the chunk's CRC checked once."""
        offset, nbytes = int(shard.index[c, 0]), int(shard.index[c, 1])
        if offset == MISSING:
            raise StoreError(f"{self._shard_label(k)}: chunk {c} is missing")
        what = f"{self._shard_label(k)} chunk {c}"
        if shard.mapped is not None:
            if not shard.verified[c]:
                check_crc32c(shard.mapped[offset:offset + nbytes], what)
                shard.verified[c] = True
            return shard.mapped, offset
        buf = self.cache.get(f"{self.key}/{k}/{c}")
        if buf is None or len(buf) != nbytes:
            buf = self._fetch(k, [c])[c]
        elif not shard.verified[c]:
            try:
                check_crc32c(bytes(buf), what)
            except StoreError:  # a damaged cache file: the object itself decides
                self.cache.drop(f"{self.key}/{k}/{c}")
                buf = self._fetch(k, [c])[c]
            shard.verified[c] = True
        return buf, 0

    # -- remote fetches ---------------------------------------------------------------------
    def _ensure(self, a: int, b: int) -> None:
        """Fetch the chunks [a, b) needs that are neither cached nor on their way, in as few
        GETs as there are runs of adjacent missing chunks."""
        for k, c0, c1 in self._chunk_runs(a, b):
            self.shard(k)
            missing = []
            for c in range(c0, c1 + 1):
                pending = self._inflight.get((k, c))
                if pending is not None:
                    try:
                        pending.result()
                    except Exception:  # fetched again below; that read reports what fails
                        pass
                if self.cache.get(f"{self.key}/{k}/{c}") is None:
                    missing.append(c)
            if missing:
                self._fetch(k, missing)

    def _fetch(self, k: int, chunks: list[int]) -> dict[int, bytes]:
        """GET these chunks of shard k (runs of adjacent chunks in one request each), check
        their CRCs, cache them. A chunk that fails its check is never cached."""
        shard = self.shard(k)
        key = f"{self.key}/c/{k}"
        got: dict[int, bytes] = {}
        for run in _runs(shard.index, chunks):
            first, last = run[0], run[-1]
            start = int(shard.index[first, 0])
            end = int(shard.index[last, 0] + shard.index[last, 1])
            for c in run:
                if int(shard.index[c, 0]) == MISSING:
                    raise StoreError(f"{self._shard_label(k)}: chunk {c} is missing")
            try:
                data = self.storage.read_range(key, start, end - start)
            except ObjectMissing:
                raise StoreError(f"{self._shard_label(k)}: shard object is missing "
                                 f"({self.storage.url(key)})") from None
            for c in run:
                off, n = int(shard.index[c, 0]) - start, int(shard.index[c, 1])
                chunk = data[off:off + n]
                check_crc32c(chunk, f"{self._shard_label(k)} chunk {c}")
                got[c] = self.cache.put(f"{self.key}/{k}/{c}", chunk)
                shard.verified[c] = True
        return got

    def prefetch(self, a: int, b: int) -> None:
        """Start fetching the chunks [a, b) needs in the background (remote stores only)."""
        if not self.remote or self._pool is None:
            return
        for k, c0, c1 in self._chunk_runs(a, b):
            todo = []
            with self._lock:
                for c in range(c0, c1 + 1):
                    if (k, c) not in self._inflight:
                        self._inflight[(k, c)] = Future()
                        todo.append(c)
            if todo:
                self._pool().submit(self._prefetch_job, k, todo)

    def _prefetch_job(self, k: int, todo: list[int]) -> None:
        futures = [self._inflight[(k, c)] for c in todo]
        try:
            self.shard(k)
            missing = [c for c in todo if self.cache.get(f"{self.key}/{k}/{c}") is None]
            if missing:
                self._fetch(k, missing)
            error = None
        except Exception as exc:  # the consumer's own read reports it, if it still fails
            error = exc
        with self._lock:
            for c in todo:
                self._inflight.pop((k, c), None)
        for f in futures:
            if error is None:
                f.set_result(None)
            else:
                f.set_exception(error)


def _runs(index: np.ndarray, chunks: list[int]) -> Iterator[list[int]]:
    """Group sorted chunk numbers into runs whose bytes are adjacent in the shard object."""
    run: list[int] = []
    for c in sorted(chunks):
        if run and c == run[-1] + 1 and int(index[c, 0]) == int(index[run[-1], 0] + index[run[-1], 1]):
            run.append(c)
            continue
        if run:
            yield run
        run = [c]
    if run:
        yield run
