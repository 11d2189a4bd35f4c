"""The local chunk cache of stores read over a network: bounded, on disk, shared by processes.

A remote store's shard indexes and inner chunks are kept as files under
`DIR/<store namespace>/<split>/<array>/<shard>/<chunk|index>`, exactly the bytes of the object
(chunk data with its CRC-32C), so a cached chunk is checked like a fetched one. The namespace
is a hash of the store's URL and fingerprint: a store rebuilt under the same URL never reads
another build's chunks. Several processes (the ranks of a node) share one directory; files are
written to a temporary name and renamed, so a reader sees a whole file or none, and a torn file
left by a crash fails its CRC and is fetched again.

The size bound is kept by whoever writes: after every tenth of the budget written, a process
scans the directory and deletes the least recently used files (by mtime; a process touches a
file when it first maps it) until the cache is at 80% of the budget. A process maps the chunks
it uses (page cache, shared between ranks, never counted twice) and keeps at most
`MAX_MAPS` of them mapped.

Settings: `CacheOptions`, from `data.cache_dir` / `data.cache_gb` in a run config, else
`ZEROFORGE_CACHE_DIR` / `ZEROFORGE_CACHE_GB`, else ~/.cache/zeroforge/store-cache and 16 GB.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR_ENV = "ZEROFORGE_CACHE_DIR"
CACHE_GB_ENV = "ZEROFORGE_CACHE_GB"
DEFAULT_GB = 16.0
MAX_MAPS = 8192  # ~1 GiB of 128 KiB chunks; Linux allows 65,530 maps per process
MEMORY_BYTES = 256 * 2**20  # the memory-only cache of `verify` and `prep --finalize`


@dataclass(frozen=True)
class CacheOptions:
    """Where remote chunks are cached and how much of them; `disk=False` keeps a small
    memory-only cache (a one-pass read such as verify should not churn the shared cache)."""

    dir: str | None = None
    gb: float | None = None
    disk: bool = True

    def resolved(self) -> tuple[Path, int]:
        directory = self.dir or os.environ.get(CACHE_DIR_ENV) or (
            Path.home() / ".cache" / "zeroforge" / "store-cache")
        gb = self.gb
        if gb is None:
            raw = os.environ.get(CACHE_GB_ENV, str(DEFAULT_GB))
            try:
                gb = float(raw)
            except ValueError:
                raise ValueError(f"{CACHE_GB_ENV} must be a number of GB, got {raw!r}") from None
        if not gb > 0:
            raise ValueError(f"the chunk cache size must be positive, got {gb} GB")
        return Path(directory).expanduser(), int(gb * 1e9)

    def open(self, namespace_of: str) -> ChunkCache:
        """The cache for one store (``namespace_of``: its URL and fingerprint)."""
        if not self.disk:
            return MemoryCache(MEMORY_BYTES)
        root, max_bytes = self.resolved()
        namespace = hashlib.sha256(namespace_of.encode()).hexdigest()[:24]
        return DiskCache(root, namespace, max_bytes)


class ChunkCache:
    """get(key) -> the cached bytes (a buffer) or None; put(key, data) -> a buffer of data."""

    def get(self, key: str):
        raise NotImplementedError

    def put(self, key: str, data: bytes):
        raise NotImplementedError

    def drop(self, key: str) -> None:
        """Forget a cached entry that failed its check."""
        raise NotImplementedError


class MemoryCache(ChunkCache):
    def __init__(self, max_bytes: int):
        self.max_bytes, self._bytes = max_bytes, 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str):
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: str, data: bytes):
        with self._lock:
            if key not in self._items:
                self._items[key] = data
                self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
        return data

    def drop(self, key: str) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)


class DiskCache(ChunkCache):
    def __init__(self, root: Path, namespace: str, max_bytes: int):
        self.root, self.dir, self.max_bytes = root, root / namespace, max_bytes
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._lock = threading.Lock()
        self._written = max_bytes // 10  # the first put scans: the budget may have shrunk

    def get(self, key: str):
        with self._lock:
            m = self._maps.get(key)
            if m is not None:
                self._maps.move_to_end(key)
                return m
        path = self.dir / key
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size == 0:
                return None
            m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            os.utime(fd)  # recently used: the last to be evicted
        finally:
            os.close(fd)
        with self._lock:
            self._maps[key] = m
            while len(self._maps) > MAX_MAPS:
                self._maps.popitem(last=False)  # unmapped when its last view goes
        return m

    def put(self, key: str, data: bytes):
        path = self.dir / key
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:  # a full disk, or another process clearing the cache: still usable
            tmp.unlink(missing_ok=True)
            return data
        with self._lock:
            self._written += len(data)
            scan = self._written >= self.max_bytes // 10
            if scan:
                self._written = 0
        if scan:
            self.evict()
        return data

    def drop(self, key: str) -> None:
        with self._lock:
            self._maps.pop(key, None)
        (self.dir / key).unlink(missing_ok=True)

    def size(self) -> int:
        return sum(size for _, size, _ in _files(self.root))

    def evict(self) -> None:
        """Delete least recently used files (every store's) until the cache is at 80%."""
        files = _files(self.root)
        total = sum(size for _, size, _ in files)
        if total <= self.max_bytes:
            return
        for _, size, path in sorted(files):
            try:
                path.unlink()
            except FileNotFoundError:  # another process evicted it first
                pass
            total -= size
            if total <= self.max_bytes * 0.8:
                break


def _files(root: Path) -> list[tuple[float, int, Path]]:
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.startswith("."):  # a file being written: its writer renames it soon
                continue
            path = Path(dirpath, name)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, path))
    return out
