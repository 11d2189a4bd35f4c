"""The token store: layout, creation, and the reader that training uses.

Layout (docs/token-store.md has the full description):

    STORE/zarr.json             root group; attributes describe the store (see `describe`)
    STORE/<split>/tokens        1-D uint16|uint32, the split's documents back to back
    STORE/<split>/doc_offsets   1-D int64, n_docs + 1, from 0; doc i = tokens[off[i]:off[i+1]]

Both arrays use Zarr's sharding codec: a shard (one file) holds many inner chunks, each chunk
followed by its CRC-32C, and an index (with its own CRC-32C) at the end of the shard.

A split's logical token stream may be stored in several *segments*: a multi-part build moves
each part's shard files into place without copying, so each part starts on a shard boundary of
the physical array. `segments` maps logical ranges to physical ones; a single build has one.

Reading windows through zarr's generic indexing costs ~1 ms each. On a local store the reader
instead loads each shard's index once and `pread`s exactly the bytes of the requested tokens,
checking each inner chunk's CRC-32C the first time it is touched.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
import zstandard
from zarr.codecs import Crc32cCodec, ZstdCodec

from .checksum import crc32

FORMAT_NAME = "zeroforge-token-store"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
CODECS = ("none", "zstd")
_MISSING = np.uint64(2**64 - 1)  # shard-index entry of an absent chunk
_CRC_BYTES = 4


class StoreError(ValueError):
    """A token store that must not be read: incomplete, corrupt, or not a token store."""


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


def create_split_arrays(group, split: str, dtype: np.dtype, layout: Layout) -> None:
    """Empty `tokens` and `doc_offsets` arrays for one split inside an open zarr group."""
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


# --- fast local reads ------------------------------------------------------------------------------
class _ShardFile:
    """One shard on local disk: its chunk index, read once, and positioned reads of token bytes."""

    def __init__(self, path: str, label: str, n_chunks: int, chunk_len: int, itemsize: int, codec: str):
        self.path, self.label = path, label
        self.chunk_len, self.itemsize, self.codec = chunk_len, itemsize, codec
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"{label}: shard file is missing ({path})") from None
        index_size = n_chunks * 16 + _CRC_BYTES
        size = os.fstat(self.fd).st_size
        if size < index_size:
            raise StoreError(f"{label}: shard file is truncated ({size} bytes)")
        raw = os.pread(self.fd, index_size, size - index_size)
        _check_crc32c(raw[:-_CRC_BYTES], raw[-_CRC_BYTES:], f"{label}: shard index")
        self.index = np.frombuffer(raw[:-_CRC_BYTES], dtype="<u8").reshape(n_chunks, 2)
        self.verified = np.zeros(n_chunks, dtype=bool)
        self._decoded: dict[int, np.ndarray] = {}
        # Uncompressed chunks are read straight from a read-only map of the file: as cheap as
        # np.memmap, and the page cache is shared by every process reading the store.
        self._map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ) if codec == "none" else None

    def require_chunks(self, first: int, last: int) -> None:
        missing = np.nonzero(self.index[first : last + 1, 0] == _MISSING)[0]
        if len(missing):
            raise StoreError(f"{self.label}: chunk {first + int(missing[0])} is missing")

    def _verify_chunk(self, c: int) -> bytes:
        offset, nbytes = (int(x) for x in self.index[c])
        raw = os.pread(self.fd, nbytes, offset)
        _check_crc32c(raw[:-_CRC_BYTES], raw[-_CRC_BYTES:], f"{self.label} chunk {c}")
        self.verified[c] = True
        return raw[:-_CRC_BYTES]

    def read(self, c: int, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        """Elements [start, stop) of inner chunk c."""
        if self._map is not None:
            if not self.verified[c]:
                self._verify_chunk(c)
            offset = int(self.index[c, 0]) + start * self.itemsize
            return np.frombuffer(self._map, dtype=dtype, count=stop - start, offset=offset)
        chunk = self._decoded.get(c)
        if chunk is None:
            chunk = np.frombuffer(zstandard.ZstdDecompressor().decompress(self._verify_chunk(c)), dtype=dtype)
            if len(self._decoded) >= 8:  # a few decoded chunks: windows often share one
                self._decoded.pop(next(iter(self._decoded)))
            self._decoded[c] = chunk
        return chunk[start:stop]

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view: the map goes with the last one
                pass
        os.close(self.fd)


def _check_crc32c(data: bytes, stored: bytes, what: str) -> None:
    if google_crc32c.value(data) != int.from_bytes(stored, "little"):
        raise StoreError(f"{what}: checksum mismatch (data corrupted)")


_live_readers: weakref.WeakSet = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [r._after_fork() for r in list(_live_readers)])


class SplitReader:
    """Random access to one split: `tokens(a, b)`, `doc(i)`, sizes."""

    def __init__(self, store: TokenStore, name: str):
        self.store, self.name = store, name
        info = store.attrs["counts"][name]
        self.n_tokens: int = int(info["tokens"])
        self.n_docs: int = int(info["docs"])
        self.segments = [tuple(int(x) for x in s) for s in store.attrs["segments"][name]]
        self._arrays = store.group[name]
        layout = store.layout
        self._shard, self._chunk = layout.shard_tokens, layout.chunk_tokens
        self._codec = layout.codec
        self._shards: dict[int, _ShardFile] = {}
        self._lock = threading.Lock()
        self._identity = len(self.segments) <= 1 and all(lg == ph for lg, ph, _ in self.segments)
        _live_readers.add(self)

    def __len__(self) -> int:
        return self.n_tokens

    @cached_property
    def doc_offsets(self) -> np.ndarray:
        try:
            offsets = np.asarray(self._arrays["doc_offsets"][:], dtype=np.int64)
        except ValueError as exc:  # zarr's own CRC-32C check on a chunk
            raise StoreError(f"{self.store.path}/{self.name}/doc_offsets: {exc}") from exc
        expected = self.store.attrs["checksums"][self.name]["doc_offsets"]
        if f"{crc32(offsets):08x}" != expected:
            raise StoreError(f"{self.store.path}/{self.name}/doc_offsets: checksum mismatch")
        if len(offsets) != self.n_docs + 1:
            raise StoreError(f"{self.store.path}/{self.name}/doc_offsets: {len(offsets)} entries, expected {self.n_docs + 1}")
        return offsets

    def doc(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} out of range for split {self.name} ({self.n_docs} docs)")
        off = self.doc_offsets
        return self.tokens(int(off[i]), int(off[i + 1]))

    def tokens(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the logical stream (a copy)."""
        if not 0 <= a <= b <= self.n_tokens:
            raise IndexError(f"tokens[{a}:{b}] out of range for split {self.name} ({self.n_tokens} tokens)")
        if self._identity:  # single build: logical == physical
            return self._physical(a, b)
        parts = []
        for logical, physical, length in self.segments:
            lo, hi = max(a, logical), min(b, logical + length)
            if lo < hi:
                parts.append(self._physical(physical + lo - logical, physical + hi - logical))
        if not parts:
            return np.empty(0, dtype=self.store.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _physical(self, a: int, b: int) -> np.ndarray:
        if not self.store.local:
            try:
                return np.asarray(self._arrays["tokens"][a:b])
            except ValueError as exc:  # zarr's own CRC-32C check on a chunk
                raise StoreError(f"{self.store.path}/{self.name}/tokens[{a}:{b}]: {exc}") from exc
        out, pos = [], a
        while pos < b:
            shard, within = divmod(pos, self._shard)
            c, start = divmod(within, self._chunk)
            stop = min(self._chunk, start + (b - pos))
            f = self._shards.get(shard) or self._shard_file(shard)
            out.append(f.read(c, start, stop, self.store.dtype))
            pos += stop - start
        if len(out) == 1:
            # frombuffer views are read-only; training code wants its own writable array.
            return out[0].copy()
        return np.concatenate(out) if out else np.empty(0, dtype=self.store.dtype)

    def _shard_file(self, k: int) -> _ShardFile:
        f = self._shards.get(k)
        if f is None:
            with self._lock:
                f = self._shards.get(k)
                if f is None:
                    f = self._open_shard(k)
                    self._shards[k] = f
        return f

    def _after_fork(self) -> None:
        # A forked child (e.g. a DataLoader worker) must not share file offsets or locks.
        self._shards, self._lock = {}, threading.Lock()

    def _open_shard(self, k: int) -> _ShardFile:
        path = os.path.join(self.store.path, self.name, "tokens", "c", str(k))
        label = f"{self.store.path}/{self.name}/tokens shard c/{k}"
        n_chunks = self._shard // self._chunk
        f = _ShardFile(path, label, n_chunks, self._chunk, self.store.dtype.itemsize, self._codec)
        # Every chunk that holds referenced tokens must exist: zarr would return zeros for it.
        lo, hi = k * self._shard, (k + 1) * self._shard
        for _, physical, length in self.segments:
            s, e = max(lo, physical), min(hi, physical + length)
            if s < e:
                f.require_chunks((s - lo) // self._chunk, (e - 1 - lo) // self._chunk)
        return f

    def check_shards(self) -> None:
        """Open every shard that holds referenced tokens: missing files or chunks raise."""
        for _, physical, length in self.segments:
            if length:
                for k in range(physical // self._shard, (physical + length - 1) // self._shard + 1):
                    self._shard_file(k)

    def close(self) -> None:
        for f in self._shards.values():
            f.close()
        self._shards = {}


class TokenStore:
    """An open, complete token store. `TokenStore.open(path)` refuses anything else."""

    def __init__(self, path: str, group, attrs: dict[str, Any]):
        self.path, self.group, self.attrs = path, group, attrs
        self.local = "://" not in path
        tok = attrs["tokenizer"]
        self.tokenizer: str = tok["name"]
        self.vocab_size: int = int(tok["vocab_size"])
        self.eot_id: int = int(tok["eot_id"])
        self.dtype = np.dtype(attrs["dtype"])
        self.layout = Layout(**attrs["layout"])
        self.splits: tuple[str, ...] = tuple(attrs["counts"])
        self._readers: dict[str, SplitReader] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, check_shards: bool = True) -> TokenStore:
        path = os.fspath(path)
        if "://" not in path and not Path(path, "zarr.json").is_file():
            raise StoreError(f"{path}: not a token store (no zarr.json)")
        try:
            group = zarr.open_group(path, mode="r")
            attrs = dict(group.attrs)
        except Exception as exc:
            raise StoreError(f"{path}: cannot open as a Zarr v3 group ({exc})") from exc
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{path}: not a {FORMAT_NAME} (format={attrs.get('format')!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path}: format version {attrs.get('format_version')} is not supported (expected {FORMAT_VERSION})")
        if not attrs.get("complete"):
            raise StoreError(f"{path}: the build did not complete; rerun the same `zeroforge prep` command to finish it")
        store = cls(path, group, attrs)
        for name in store.splits:
            _require_arrays(group, path, name)
            split = store.split(name)
            shape = group[name]["tokens"].shape[0]
            end = max((p + n for _, p, n in split.segments), default=0)
            if shape < end:
                raise StoreError(f"{path}/{name}/tokens: {shape} elements on disk, segments need {end}")
            if check_shards and store.local:
                split.check_shards()
        return store

    def split(self, name: str) -> SplitReader:
        if name not in self.splits:
            raise KeyError(f"{self.path}: no split {name!r} (has {', '.join(self.splits)})")
        if name not in self._readers:
            self._readers[name] = SplitReader(self, name)
        return self._readers[name]

    @property
    def fingerprint(self) -> str:
        """Content id: changes whenever any token, document boundary or prep setting changes."""
        return f"{self.attrs['prep_config_hash'][:16]}-" + "-".join(
            self.attrs["checksums"][s]["tokens"] for s in self.splits
        )

    def close(self) -> None:
        for r in self._readers.values():
            r.close()


def _require_arrays(group, path: str, split: str) -> None:
    """The split's group and arrays exist: name the metadata file that is missing."""
    for key in (split, f"{split}/tokens", f"{split}/doc_offsets"):
        try:
            group[key]
        except KeyError:
            raise StoreError(f"{path}/{key}/zarr.json: missing (the metadata of "
                             f"{'split' if key == split else 'array'} {key!r})") from None


def describe(store: TokenStore) -> dict[str, Any]:
    """What `zeroforge inspect` shows."""
    size = sum(f.stat().st_size for f in Path(store.path).rglob("*") if f.is_file()) if store.local else None
    return {
        "path": store.path,
        "format": f"{FORMAT_NAME} v{FORMAT_VERSION}",
        "tokenizer": store.attrs["tokenizer"],
        "dtype": store.attrs["dtype"],
        "splits": store.attrs["counts"],
        "skipped": store.attrs["skipped"],
        "sources": store.attrs["sources"],
        "layout": store.attrs["layout"],
        "size_bytes": size,
        "fingerprint": store.fingerprint,
    }
