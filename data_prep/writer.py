"""Appending to a split in whole shards, with a ledger that makes the build resumable.

Zarr rewrites a whole shard on every partial write, so the writer keeps the unfinished tail of
each array in memory and writes only complete shards (plus the last, partial one when the build
finishes). A commit saves the tails to a file and then the ledger, both atomically; a restart
truncates the arrays to the shards the ledger counts and continues from its record position.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import atomic
from .checksum import crc32

LEDGER_VERSION = 1
# The tails file's entry for a document held back from the train split (build.py's _Router).
HELD = "held"


class ArrayAppender:
    """Appends to a 1-D sharded zarr array; only whole shards reach disk before `finish`."""

    def __init__(self, array, shard_len: int, flushed: int = 0, tail: np.ndarray | None = None):
        self.array, self.shard_len = array, shard_len
        self.flushed = flushed  # elements on disk, a multiple of shard_len until finish()
        self._tail = [tail] if tail is not None and len(tail) else []
        self._tail_len = sum(len(t) for t in self._tail)
        self.crc = 0  # running CRC-32 of everything appended, set by the owner on resume

    def __len__(self) -> int:
        return self.flushed + self._tail_len

    def append(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        self._tail.append(values)
        self._tail_len += len(values)
        self.crc = crc32(values, self.crc)
        if self._tail_len >= self.shard_len:
            self._flush_full_shards()

    def tail(self) -> np.ndarray:
        if len(self._tail) != 1:
            dtype = self.array.dtype
            self._tail = [np.concatenate(self._tail) if self._tail else np.empty(0, dtype=dtype)]
        return self._tail[0]

    def _write(self, values: np.ndarray) -> None:
        end = self.flushed + len(values)
        self.array.resize((end,))
        self.array[self.flushed : end] = values
        self.flushed = end

    def _flush_full_shards(self) -> None:
        data = self.tail()
        n_full = len(data) // self.shard_len * self.shard_len
        self._write(data[:n_full])
        self._tail, self._tail_len = [data[n_full:]], len(data) - n_full

    def finish(self) -> None:
        """Write the partial last shard; the array then has its exact final length."""
        data = self.tail()
        if len(data):
            self._write(data)
        self._tail, self._tail_len = [], 0
        self.array.resize((self.flushed,))


@dataclass
class SplitState:
    """What the ledger remembers of one split between commits."""

    n_docs: int = 0
    tokens_flushed: int = 0
    offsets_flushed: int = 0
    tokens_crc: int = 0
    offsets_crc: int = 0


@dataclass
class Ledger:
    config_hash: str
    records_done: int = 0  # records (documents and skipped ones) fully consumed from the input
    text_bytes: int = 0
    commit: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    splits: dict[str, SplitState] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "version": LEDGER_VERSION,
            "config_hash": self.config_hash,
            "records_done": self.records_done,
            "text_bytes": self.text_bytes,
            "commit": self.commit,
            "skipped": self.skipped,
            "splits": {k: vars(v) for k, v in self.splits.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> Ledger:
        if d.get("version") != LEDGER_VERSION:
            raise ValueError(f"build ledger version {d.get('version')} is not {LEDGER_VERSION}")
        return cls(
            config_hash=d["config_hash"],
            records_done=d["records_done"],
            text_bytes=d["text_bytes"],
            commit=d["commit"],
            skipped=dict(d["skipped"]),
            splits={k: SplitState(**v) for k, v in d["splits"].items()},
        )


class SplitWriter:
    """tokens + doc_offsets of one split."""

    def __init__(self, group, name: str, shard_tokens: int, offsets_shard: int, state: SplitState, tails: dict):
        self.name = name
        self.tokens = ArrayAppender(group[name]["tokens"], shard_tokens, state.tokens_flushed, tails.get("tokens"))
        self.offsets = ArrayAppender(
            group[name]["doc_offsets"], offsets_shard, state.offsets_flushed, tails.get("offsets")
        )
        self.tokens.crc, self.offsets.crc = state.tokens_crc, state.offsets_crc
        self.n_docs = state.n_docs
        if len(self.offsets) == 0:
            self.offsets.append(np.zeros(1, dtype=np.int64))

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append whole documents (`lengths` sums to len(tokens))."""
        start = len(self.tokens)
        self.tokens.append(tokens)
        self.offsets.append(start + np.cumsum(lengths))
        self.n_docs += len(lengths)

    def state(self) -> SplitState:
        return SplitState(self.n_docs, self.tokens.flushed, self.offsets.flushed, self.tokens.crc, self.offsets.crc)

    def finish(self) -> None:
        self.tokens.finish()
        self.offsets.finish()


class BuildDir:
    """`STORE/_build/`: the ledger and the tails it refers to."""

    def __init__(self, store: Path):
        self.path = store / "_build"
        self.ledger_path = self.path / "ledger.json"

    def exists(self) -> bool:
        return self.ledger_path.is_file()

    def load(self) -> tuple[Ledger, dict[str, dict[str, np.ndarray]]]:
        ledger = Ledger.from_json(json.loads(self.ledger_path.read_text()))
        tails: dict[str, dict[str, np.ndarray]] = {}
        tail_file = self.path / f"tails-{ledger.commit}.npz"
        if tail_file.is_file():
            with np.load(tail_file) as z:
                for key in z.files:
                    split, kind = key.split("/")
                    tails.setdefault(split, {})[kind] = z[key]
        return ledger, tails

    def write_initial(self, ledger: Ledger) -> None:
        """Commit 0: the build has started and nothing is written yet."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.ledger_path, ledger.to_json())

    def commit(self, ledger: Ledger, writers: dict[str, SplitWriter], held: np.ndarray | None = None) -> None:
        """Tails first, then the ledger that names them: a kill between the two keeps the old commit.

        `held`: a consumed document not yet in any split (its record counts as done).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        ledger.commit += 1
        ledger.splits = {name: w.state() for name, w in writers.items()}
        tail_file = self.path / f"tails-{ledger.commit}.npz"
        arrays = {}
        for name, w in writers.items():
            arrays[f"{name}/tokens"] = w.tokens.tail()
            arrays[f"{name}/offsets"] = w.offsets.tail()
        if held is not None:
            arrays[f"{HELD}/tokens"] = held
        atomic.write_with(tail_file, lambda f: np.savez(f, **arrays))
        atomic.write_json(self.ledger_path, ledger.to_json())
        old = self.path / f"tails-{ledger.commit - 1}.npz"
        if old.exists():
            old.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def truncate_array(array, length: int) -> None:
    """Cut an array back to `length` elements and delete shard files written past it."""
    array.resize((length,))
    shard = array.shards[0] if array.shards else array.chunks[0]
    store_path = getattr(array.store, "root", None)
    if store_path is None:
        return
    shard_dir = Path(store_path) / array.path / "c"
    if shard_dir.is_dir():
        first_stale = -(-length // shard)
        for f in shard_dir.iterdir():
            if f.name.isdigit() and int(f.name) >= first_stale:
                f.unlink()
