"""Corpora -> tiktoken -> sharded Zarr v3 token store."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zeroforge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
