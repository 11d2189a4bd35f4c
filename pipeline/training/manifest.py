"""A directory's manifest: every file it holds, with its size and CRC-32C.

A checkpoint tag gets one before its ``COMMITTED`` marker (training/checkpoint.py), and so does
the universal conversion of an elastic resume (training/elastic.py). Whoever loads those files
first compares them with the manifest: a truncated file is caught by its size without reading
it, a flipped byte by its CRC-32C. The manifest is JSON, itself checksummed by whoever points at
it (the commit marker records its CRC-32C).

No torch here: ``zeroforge verify`` checks a checkpoint without importing it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import google_crc32c
from zeroforge.data_prep import atomic
from zeroforge.data_prep.checksum import CRC32C_POLY, crc32_combine

MANIFEST = "MANIFEST.json"
VERSION = 1
# Big enough that google_crc32c releases the GIL (it does from 1 MiB) and a read costs little
# per byte; small enough to stay in the CPU caches.
_CHUNK = 4 << 20
# Files are checksummed in segments of this size on a thread pool (reads and CRC both release
# the GIL) and the segments' CRCs combined: one big optimizer shard uses every core.
_SEGMENT = 64 << 20
_MAX_THREADS = 8

Entry = dict[str, Any]  # {"size": bytes, "crc32c": "8 hex digits"}


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, or not the one the commit marker names."""


def crc32c_hex(data: bytes) -> str:
    return f"{google_crc32c.value(data):08x}"


def _segment_crc(fd: int, offset: int, length: int) -> int:
    crc, end = 0, offset + length
    while offset < end:
        chunk = os.pread(fd, min(_CHUNK, end - offset), offset)
        if not chunk:
            raise OSError(f"file shrank while being read (at byte {offset})")
        crc = google_crc32c.extend(crc, chunk)
        offset += len(chunk)
    return crc


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def file_entries(paths: list[Path], threads: int | None = None) -> list[Entry]:
    """Size and CRC-32C of each file; all their segments are read on one thread pool of
    ``threads`` (default: the usable cores, at most 8)."""
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        sizes = [os.fstat(fd).st_size for fd in fds]
        segments = [(i, off, min(_SEGMENT, size - off))
                    for i, size in enumerate(sizes) for off in range(0, size, _SEGMENT)]
        threads = max(1, min(threads or _MAX_THREADS, usable_cores(), len(segments)))
        with ThreadPoolExecutor(threads) as pool:
            crcs = list(pool.map(lambda seg: _segment_crc(fds[seg[0]], seg[1], seg[2]),
                                 segments))
    finally:
        for fd in fds:
            os.close(fd)
    totals = [0] * len(paths)
    for (i, _, length), crc in zip(segments, crcs, strict=True):
        totals[i] = crc32_combine(totals[i], crc, length, CRC32C_POLY)
    return [{"size": size, "crc32c": f"{crc:08x}"} for size, crc in zip(sizes, totals,
                                                                        strict=True)]



def data_files(directory: Path, recursive: bool, exclude: Iterable[str] = ()) -> list[str]:
    """Relative paths (posix) of the files a manifest of ``directory`` covers: not the manifest,
    not ``exclude``, not hidden entries (atomic.py's work in progress, a conversion's temp
    directory). Top-level files only unless ``recursive``."""
    skip = {MANIFEST, *exclude}
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if recursive and not d.startswith("."))
        rel = Path(root).relative_to(directory)
        out += [(rel / f).as_posix() for f in files if not f.startswith(".")]
    return sorted(p for p in out if p not in skip)


def write(directory: Path, files: dict[str, Entry]) -> str:
    """Write ``directory``'s manifest atomically; returns the manifest's own CRC-32C."""
    data = json.dumps({"version": VERSION, "algorithm": "crc32c",
                       "files": dict(sorted(files.items()))}, indent=1).encode()
    atomic.write_bytes(directory / MANIFEST, data)
    return crc32c_hex(data)


def read(directory: Path, expected_crc: str | None = None) -> dict[str, Entry]:
    """The files a manifest lists; ``expected_crc`` (from the marker) must match its bytes."""
    path = directory / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing") from None
    if expected_crc is not None and crc32c_hex(data) != expected_crc:
        raise ManifestError(f"{path}: checksum mismatch (crc32c {crc32c_hex(data)}, the commit "
                            f"marker says {expected_crc})")
    try:
        doc = json.loads(data)
        files = doc["files"]
        ok = doc.get("version") == VERSION and all(
            isinstance(e.get("size"), int) and isinstance(e.get("crc32c"), str)
            for e in files.values())
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise ManifestError(f"{path}: not a version-{VERSION} manifest")
    return files


def check(directory: Path, files: dict[str, Entry], names: Iterable[str] | None = None,
          threads: int | None = None) -> list[str]:
    """Problems of the listed files ``names`` (default: all), each naming its file: missing,
    truncated or grown (by size, without reading it), or a checksum mismatch."""
    problems, to_read = [], []
    for name in sorted(files) if names is None else names:
        want, path = files.get(name), directory / name
        if want is None:
            problems.append(f"{path}: not in the manifest")
            continue
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if size != want["size"]:
            what = "truncated" if size < want["size"] else "grown"
            problems.append(f"{path}: {what} ({size} bytes, the manifest says {want['size']})")
            continue
        to_read.append((path, want))
    try:
        got = file_entries([path for path, _ in to_read], threads)
    except OSError as e:
        return problems + [f"{directory}: cannot be read ({e})"]
    for (path, want), entry in zip(to_read, got, strict=True):
        if entry["crc32c"] != want["crc32c"]:
            problems.append(f"{path}: checksum mismatch (crc32c {entry['crc32c']}, the manifest "
                            f"says {want['crc32c']})")
    return problems


def verify(directory: Path, expected_crc: str | None = None,
           names: Iterable[str] | None = None) -> list[str]:
    """``check`` against ``directory``'s manifest; a bad manifest is the one problem."""
    try:
        files = read(directory, expected_crc)
    except ManifestError as e:
        return [str(e)]
    return check(directory, files, names)
