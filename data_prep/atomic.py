"""Atomic file replacement, the one way zeroforge commits a file.

Write a hidden temporary sibling, fsync it, rename it over the target, fsync the directory.
A reader, or a process killed at any point, sees the old content or the new one, never a torn
mix, and after the directory fsync the rename survives a power loss as well. Token-store
ledgers, checkpoint markers and manifests, metrics files and caches all go through here.

This module sits at the bottom of the import graph (data_prep imports nothing from pipeline),
so every package can use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """The temporary sibling this process writes before renaming it to ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def is_temp(path: Path) -> bool:
    """Whether ``path`` is such a temporary sibling (some writer's work in progress)."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file's data, or a directory's entries (what makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_with(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Replace ``path`` atomically with what ``write(f)`` writes to a binary file object."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` atomically with ``data``."""
    write_with(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 1) -> None:
    """Replace ``path`` atomically with ``obj`` as JSON (keys sorted: stable bytes)."""
    write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode())


def replace_dir(tmp_dir: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename a finished directory into place after fsyncing everything in it."""
    tmp_dir, target = Path(tmp_dir), Path(target)
    for root, _, files in os.walk(tmp_dir):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(root)
    os.replace(tmp_dir, target)
    fsync_path(target.parent)
