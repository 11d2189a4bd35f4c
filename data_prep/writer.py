"""Appending to a split in whole shards, with a ledger that makes the build resumable.

Zarr rewrites a whole shard on every partial write, so the writer keeps the unfinished tail of
each array in memory and writes only complete shards (plus the last, partial one when the build
finishes): on object storage every shard goes up as one whole object. A commit saves the tails
and then the ledger, each one whole object (an atomic rename on disk, a single PUT on S3); a
restart truncates the arrays to the shards the ledger counts and continues from its record
position.

The ledger is also the build's claim on the store (`Claim`): every write of it is conditional
on the version this process last wrote (If-Match on S3, a locked compare on disk), so of two
builds writing one store the one that lost stops at its next commit instead of both going on.
A build finishes with one more conditional ledger write that says `finished`; only then does
the completion flag go into the root attributes, and a build that finds a finished ledger
truncates nothing. See docs/token-store.md, "Build protocol".
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass, field

import numpy as np

from .checksum import crc32
from .storage import Storage, WriteConflict
from .store import LOSS_MASK

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
    # Fine-tuning stores only: the loss mask is flushed with the tokens (same shard length).
    mask_crc: int = 0
    loss_tokens: int = 0


@dataclass
class Ledger:
    config_hash: str
    records_done: int = 0  # records (documents and skipped ones) fully consumed from the input
    text_bytes: int = 0
    commit: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    splits: dict[str, SplitState] = field(default_factory=dict)
    # Set by the last ledger write of a build: the root attributes that make it complete.
    final_attrs: dict | None = None

    def to_json(self) -> dict:
        return {
            "version": LEDGER_VERSION,
            "config_hash": self.config_hash,
            "records_done": self.records_done,
            "text_bytes": self.text_bytes,
            "commit": self.commit,
            "skipped": self.skipped,
            "splits": {k: vars(v) for k, v in self.splits.items()},
            "final_attrs": self.final_attrs,
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
            final_attrs=d.get("final_attrs"),
        )


class SplitWriter:
    """tokens + doc_offsets of one split, and the loss mask of a fine-tuning store."""

    def __init__(self, group, name: str, shard_tokens: int, offsets_shard: int, state: SplitState, tails: dict):
        self.name = name
        self.tokens = ArrayAppender(group[name]["tokens"], shard_tokens, state.tokens_flushed, tails.get("tokens"))
        self.offsets = ArrayAppender(
            group[name]["doc_offsets"], offsets_shard, state.offsets_flushed, tails.get("offsets")
        )
        self.tokens.crc, self.offsets.crc = state.tokens_crc, state.offsets_crc
        self.mask: ArrayAppender | None = None
        if LOSS_MASK in group[name]:
            self.mask = ArrayAppender(group[name][LOSS_MASK], shard_tokens, state.tokens_flushed,
                                      tails.get(LOSS_MASK))
            self.mask.crc = state.mask_crc
        self.n_docs, self.loss_tokens = state.n_docs, state.loss_tokens
        if len(self.offsets) == 0:
            self.offsets.append(np.zeros(1, dtype=np.int64))

    def add(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append whole documents (`lengths` sums to len(tokens)), with their loss mask in a
        fine-tuning store."""
        assert (mask is None) == (self.mask is None), "a loss mask goes with a fine-tuning store"
        start = len(self.tokens)
        self.tokens.append(tokens)
        self.offsets.append(start + np.cumsum(lengths))
        self.n_docs += len(lengths)
        if self.mask is not None:
            self.mask.append(mask)
            self.loss_tokens += int(mask.sum())

    def state(self) -> SplitState:
        mask_crc = self.mask.crc if self.mask is not None else 0
        return SplitState(self.n_docs, self.tokens.flushed, self.offsets.flushed, self.tokens.crc,
                          self.offsets.crc, mask_crc, self.loss_tokens)

    def finish(self) -> None:
        self.tokens.finish()
        self.offsets.finish()
        if self.mask is not None:
            self.mask.finish()


class Claim:
    """A JSON document that one process at a time owns: each write is conditional on the
    version this process last read or wrote, and carries this process's id so that two
    writers' documents never have the same bytes (and version)."""

    def __init__(self, storage: Storage, key: str, what: str):
        self.storage, self.key, self.what = storage, key, what
        self.writer = uuid.uuid4().hex
        self.version: str | None = None  # None: this process has not read or written it

    def exists(self) -> bool:
        return self.storage.exists(self.key)

    def read(self) -> dict:
        data, self.version = self.storage.read_versioned(self.key)
        return json.loads(data)

    def write(self, doc: dict, create: bool = False) -> None:
        """Create the document (``create``: it must not exist) or replace the version this
        process holds; WriteConflict names the store when someone else wrote in between."""
        body = (json.dumps({**doc, "writer": self.writer}, indent=1, sort_keys=True) + "\n").encode()
        try:
            self.version = self.storage.write_if(self.key, body, None if create else self.version)
        except WriteConflict:
            raise WriteConflict(
                f"{self.storage.location}: another process is writing this store (its "
                f"{self.what} changed under this one); run one build per store, or wait for "
                "the other to finish and rerun") from None


class BuildDir:
    """`STORE/_build/`: the ledger and the tails it refers to."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.ledger = Claim(storage, "_build/ledger.json", "build ledger")

    def exists(self) -> bool:
        return self.ledger.exists()

    def config_hash(self) -> str | None:
        return json.loads(self.storage.read(self.ledger.key)).get("config_hash")

    def load(self) -> tuple[Ledger, dict[str, dict[str, np.ndarray]]]:
        """The committed ledger and tails; the ledger's version becomes the one this build
        must hold to write (call `take` before changing anything)."""
        ledger = Ledger.from_json(self.ledger.read())
        tails: dict[str, dict[str, np.ndarray]] = {}
        tail_key = f"_build/tails-{ledger.commit}.npz"
        if ledger.commit and self.storage.exists(tail_key):
            with np.load(io.BytesIO(self.storage.read(tail_key))) as z:
                for key in z.files:
                    split, kind = key.split("/")
                    tails.setdefault(split, {})[kind] = z[key]
        return ledger, tails

    def take(self, ledger: Ledger) -> None:
        """Claim the interrupted build just loaded, before truncating anything: a build still
        running on it loses at its next commit."""
        self.ledger.write(ledger.to_json())

    def write_initial(self, ledger: Ledger) -> None:
        """Commit 0: the build has started and nothing is written yet (create-only)."""
        self.ledger.write(ledger.to_json(), create=True)

    def commit(self, ledger: Ledger, writers: dict[str, SplitWriter],
               held: dict[str, np.ndarray] | None = None) -> None:
        """Tails first, then the ledger that names them: a kill between the two keeps the old commit.

        `held`: a consumed document not yet in any split (its record counts as done): its
        tokens, and its loss mask in a store of examples.
        """
        ledger.commit += 1
        ledger.splits = {name: w.state() for name, w in writers.items()}
        arrays = {}
        for name, w in writers.items():
            arrays[f"{name}/tokens"] = w.tokens.tail()
            arrays[f"{name}/offsets"] = w.offsets.tail()
            if w.mask is not None:
                arrays[f"{name}/{LOSS_MASK}"] = w.mask.tail()
        for kind, arr in (held or {}).items():
            arrays[f"{HELD}/{kind}"] = arr
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self.storage.write(f"_build/tails-{ledger.commit}.npz", buf.getvalue())
        self.ledger.write(ledger.to_json())
        self.storage.delete([f"_build/tails-{ledger.commit - 1}.npz"])

    def finish(self, ledger: Ledger, final_attrs: dict) -> None:
        """The point of no return: after this conditional write nobody truncates the store,
        and whoever finds it (this build or a rerun) only writes the completion flag."""
        ledger.final_attrs = final_attrs
        self.ledger.write(ledger.to_json())

    def remove(self) -> None:
        self.storage.delete_prefix("_build/")


def truncate_array(array, length: int, storage: Storage) -> None:
    """Cut an array back to `length` elements and delete shard objects written past it."""
    array.resize((length,))
    shard = array.shards[0] if array.shards else array.chunks[0]
    first_stale = -(-length // shard)
    prefix = f"{array.path}/c/"
    stale = [k for k in storage.list(prefix) if k[len(prefix):].isdigit()
             and int(k[len(prefix):]) >= first_stale]
    storage.delete(stale)
