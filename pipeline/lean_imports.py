"""Imports that DeepSpeed makes for features zeroforge never uses, and that cost every rank
seconds before its first step (measured on the 2-core development VM, warm caches):

- ``import deepspeed`` imports its autotuner, which imports mlflow when it is installed:
  1.3-1.7 s. (Rank 0 imports mlflow itself when tracking is on; the other ranks need not.)
- DeepSpeed's ZeRO and bf16 optimizers import its Muon optimizer and update function, at
  engine build and in the first step, only to ask ``isinstance(optimizer, MuonWithAuxAdam)``
  and to hold ``muon_update`` for parameters marked ``use_muon``; those modules apply
  ``torch.compile`` at import, which loads inductor: 2-3 s.

``import_deepspeed`` imports DeepSpeed with mlflow hidden (its import sits in a
``try/except ImportError``); ``without_muon`` puts stand-in Muon modules in place: a class
nothing is an instance of, an update that refuses to run. zeroforge only ever builds AdamW
(the DeepSpeed config's ``optimizer`` is run-owned, training/ds_config.py) and marks no
parameter ``use_muon``. Both apply to the DeepSpeed version these
module paths were read from (``LEAN_FOR``); on another the imports happen as usual.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
import types
from collections.abc import Iterator

LEAN_FOR = ("0.19.8",)  # DeepSpeed versions whose import paths are named below
MUON_OPTIMIZER = "deepspeed.runtime.zero.muon.muon_optimizer"
MUON_UPDATE = "deepspeed.runtime.zero.muon.original_muon"


def _applies() -> bool:
    try:
        return importlib.metadata.version("deepspeed") in LEAN_FOR
    except importlib.metadata.PackageNotFoundError:
        return False


@contextlib.contextmanager
def hidden(*modules: str) -> Iterator[None]:
    """``import m`` raises ImportError inside the block, for each ``m`` not imported yet."""
    added = [m for m in modules if m not in sys.modules]
    for m in added:
        sys.modules[m] = None  # type: ignore[assignment]  # the import system's "not found"
    try:
        yield
    finally:
        for m in added:
            if sys.modules.get(m, "") is None:
                del sys.modules[m]


def import_deepspeed() -> None:
    """Import DeepSpeed without its optional mlflow import (no effect once it is imported)."""
    with hidden(*(("mlflow",) if _applies() else ())):
        import deepspeed  # noqa: F401  -- the import is the point


class _NoMuon:
    """Stands in for DeepSpeed's MuonWithAuxAdam, which zeroforge never builds."""


def _no_muon_update(*args: object, **kwargs: object) -> None:
    raise RuntimeError("DeepSpeed's Muon update was replaced by zeroforge's stand-in "
                       "(pipeline/lean_imports.py): zeroforge trains with AdamW only")


def without_muon() -> None:
    """Put the stand-in Muon modules in place (before the engine is built; idempotent)."""
    if not _applies():
        return
    for name, attr, value in ((MUON_OPTIMIZER, "MuonWithAuxAdam", _NoMuon),
                              (MUON_UPDATE, "muon_update", _no_muon_update)):
        if name not in sys.modules:
            stub = types.ModuleType(name, "zeroforge stand-in: Muon is never used")
            setattr(stub, attr, value)
            sys.modules[name] = stub
