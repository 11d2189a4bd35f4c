"""Where a token store's bytes live: a local directory or an S3 prefix, behind one interface.

The store's format logic (the writer and its ledger, multi-part finalize, the reader, verify)
speaks only to `Storage`: whole-object reads and writes, ranged reads, listing, deletes, moves,
and the one conditional write that build claims rest on (`write_if`). `LocalStorage` is a
directory; s3.py has the S3 one; locations.py turns what the user typed into one of them.

Keys are relative to the store root and always use `/` (`train/tokens/c/3`).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import re
import shutil
from pathlib import Path

import zarr.storage

from . import atomic

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(ValueError):
    """An object that cannot be read or written; the message names it and says why."""


class ObjectMissing(StorageError):
    """The object does not exist."""


class WriteConflict(StorageError):
    """A conditional write lost: the object changed since this process last read or wrote it."""


def url_scheme(location: str) -> str | None:
    """The scheme of a URL (`s3` for `s3://b/k`); None for a plain path."""
    m = _URL.match(location)
    return m.group(1).lower() if m else None


def join(location: str, *parts: str) -> str:
    """``location`` with path parts appended, for plain paths and URLs alike."""
    if url_scheme(location) is None:
        return os.path.join(location, *parts)
    return "/".join([location.rstrip("/"), *(p.strip("/") for p in parts)])


class Storage:
    """A flat namespace of immutable-looking objects under one root (see the module doc)."""

    location: str  # as the user gave it; messages name objects as location/key

    def url(self, key: str) -> str:
        return join(self.location, key) if key else self.location

    def read(self, key: str) -> bytes:
        raise NotImplementedError

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``start``; StorageError when the object is shorter."""
        raise NotImplementedError

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        """The content and its version (what `write_if` compares against)."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> dict[str, int]:
        """Every object under ``prefix`` (a key ending in `/`, or ``""``): key -> size."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:
        """Replace ``key`` with ``data`` as one whole object: a reader sees the old or the new."""
        raise NotImplementedError

    def write_if(self, key: str, data: bytes, expect: str | None) -> str:
        """Write only if ``key`` is absent (``expect=None``) or still at version ``expect``;
        returns the new version, raises WriteConflict otherwise."""
        raise NotImplementedError

    def delete(self, keys: list[str]) -> None:
        """Delete these objects; absent ones are fine."""
        raise NotImplementedError

    def delete_prefix(self, prefix: str = "") -> None:
        """Delete everything under ``prefix``; the root `zarr.json` first, so a store being
        deleted stops reading as a store before its data goes."""
        keys = sorted(self.list(prefix), key=lambda k: (k != "zarr.json", k))
        if keys[:1] == ["zarr.json"]:
            self.delete(keys[:1])
            keys = keys[1:]
        self.delete(keys)

    def move(self, src: str, dst: str) -> None:
        """Give object ``src`` the key ``dst`` (replacing it); ``src`` is gone afterwards."""
        raise NotImplementedError

    def is_empty(self) -> bool:
        return not self.list("")

    def mapped(self, key: str) -> mmap.mmap | None:
        """A read-only map of a local object, or None where objects are fetched over a network
        (the reader then goes through its chunk cache)."""
        return None

    def zarr_store(self):
        """The zarr store over the same root, for the writer's arrays."""
        raise NotImplementedError

    @property
    def remote(self) -> bool:
        return False


def _content_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class LocalStorage(Storage):
    """A directory. Writes go through data_prep/atomic.py (temp file, fsync, rename)."""

    def __init__(self, root: Path, location: str):
        self.root, self.location = root, location

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectMissing(f"{self.url(key)}: does not exist") from None
        except IsADirectoryError:
            raise StorageError(f"{self.url(key)}: is a directory, not a file") from None

    def read_range(self, key: str, start: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectMissing(f"{self.url(key)}: does not exist") from None
        try:
            data = os.pread(fd, length, start)
        finally:
            os.close(fd)
        if len(data) != length:
            raise StorageError(f"{self.url(key)}: truncated (bytes {start}-{start + length} "
                               f"asked, {len(data)} there)")
        return data

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.read(key)
        return data, _content_version(data)

    def list(self, prefix: str = "") -> dict[str, int]:
        base = self._path(prefix.rstrip("/"))
        if base.is_file():
            return {prefix.rstrip("/"): base.stat().st_size}
        out = {}
        for root, _, files in os.walk(base):
            for name in files:
                p = Path(root, name)
                out[p.relative_to(self.root).as_posix()] = p.stat().st_size
        return out

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, data)

    def write_if(self, key: str, data: bytes, expect: str | None) -> str:
        # POSIX has no compare-and-swap on files: an exclusive lock on a sibling lock file makes
        # "compare the version, then rename" one step for every process on this machine.
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = _content_version(path.read_bytes()) if path.is_file() else None
            if current != expect:
                raise WriteConflict(f"{self.url(key)}: changed by another process")
            atomic.write_bytes(path, data)
        return _content_version(data)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            path.with_name(f".{path.name}.lock").unlink(missing_ok=True)  # write_if's, if any

    def delete_prefix(self, prefix: str = "") -> None:
        base = self._path(prefix.rstrip("/"))
        if prefix == "" and base.is_dir():
            (base / "zarr.json").unlink(missing_ok=True)
        if base.is_dir():
            shutil.rmtree(base)
        else:
            base.unlink(missing_ok=True)

    def move(self, src: str, dst: str) -> None:
        target = self._path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self._path(src), target)
        except FileNotFoundError:
            raise ObjectMissing(f"{self.url(src)}: does not exist") from None

    def is_empty(self) -> bool:
        if not self.root.exists():
            return True
        return self.root.is_dir() and not any(self.root.iterdir())

    def mapped(self, key: str) -> mmap.mmap | None:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectMissing(f"{self.url(key)}: does not exist") from None
        try:
            if os.fstat(fd).st_size == 0:
                raise StorageError(f"{self.url(key)}: is empty")
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)  # the map keeps its own reference to the file

    def zarr_store(self):
        return zarr.storage.LocalStore(self.root)
