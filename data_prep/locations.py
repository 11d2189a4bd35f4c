"""What a store location names, and the storage it opens.

`open_storage` turns what the user typed (`--out`, `data.store`, ...) into a `Storage`: a local
directory, file://PATH, or s3://BUCKET/PREFIX. Any other URL scheme is refused with one line,
so `s3://b/x` can never again become a local folder `s3:/b/x` (what `Path("s3://b/x")` is).
"""

from __future__ import annotations

import os
from pathlib import Path

from .storage import LocalStorage, Storage, StorageError, url_scheme

SCHEMES = ("s3",)  # besides plain paths and file://


def location_problem(location: str, what: str) -> str | None:
    """Why ``location`` cannot be a store location (one line naming ``what``), else None."""
    scheme = url_scheme(location)
    if scheme is None or scheme == "file":
        return None
    if scheme not in SCHEMES:
        return (f"{what}: URL scheme '{scheme}://' is not supported ({location}); "
                f"use a local path or s3://BUCKET/PREFIX")
    if scheme == "s3":
        bucket = location[len("s3://"):].split("/", 1)[0]
        if len(bucket) < 3:
            return (f"{what}: {location} has no valid bucket name (S3 bucket names are 3 to 63 "
                    "characters; expected s3://BUCKET/PREFIX)")
    return None


def local_path_problem(value: str, what: str) -> str | None:
    """Why ``value`` cannot be a local path (it is a URL), else None: for settings that are
    local only (run directories, checkpoints), so a URL is refused instead of becoming a folder."""
    scheme = url_scheme(value)
    if scheme is None:
        return None
    return f"{what}: must be a local path, got the URL {value} ('{scheme}://' is not supported here)"


def open_storage(location: str | os.PathLike[str]) -> Storage:
    """The storage at ``location``: a local directory, file://PATH, or s3://BUCKET/PREFIX."""
    location = os.fspath(location)
    problem = location_problem(location, "store location")
    if problem:
        raise StorageError(problem)
    scheme = url_scheme(location)
    if scheme == "s3":
        # Imported here: obstore and botocore cost ~0.25 s that local stores never need to pay.
        from .s3 import S3Storage

        return S3Storage(location)
    if scheme == "file":
        return LocalStorage(Path(location[len("file://"):]), location)
    return LocalStorage(Path(location), location)
