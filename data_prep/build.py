"""`zeroforge prep`: read -> tokenize -> append in input order -> commit, resumable at any point.

The main process reads records in order and routes each encoded document to its split; worker
processes only tokenize. Results come back in submission order, so the store is the same for
any number of workers, and a restart that skips the committed records continues the same
stream: the finished store is identical however often the build was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zarr

from . import __version__
from .examples import ExampleOptions
from .locations import open_storage
from .progress import Progress
from .sources import Record, SourceOptions, check_format, expand_inputs, partition, read_records
from .storage import Storage, StorageError
from .store import (
    EXAMPLES_FORMAT_VERSION,
    FORMAT_NAME,
    LOSS_MASK,
    SPLITS,
    TEXT_FORMAT_VERSION,
    Layout,
    create_split_arrays,
)
from .tokenize import BatchEncoder, get_encoding, token_dtype
from .writer import HELD, BuildDir, Ledger, SplitState, SplitWriter, truncate_array

log = logging.getLogger(__name__)


class PrepError(ValueError):
    """A build that must stop: bad settings, a bad record under --strict, nothing to build."""


# Share of documents in the val split by default: every recipe evaluates, so a store built with
# no options must have one (docs/token-store.md). 1%: enough windows for the recipes' fixed
# evaluation sets on a small corpus, little taken from a large one.
DEFAULT_VAL_FRACTION = 0.01


@dataclass(frozen=True)
class PrepOptions:
    tokenizer: str = "gpt2"
    val_fraction: float = DEFAULT_VAL_FRACTION
    source: SourceOptions = field(default_factory=SourceOptions)
    layout: Layout = field(default_factory=Layout)
    examples: ExampleOptions = field(default_factory=ExampleOptions)  # --format and its fields
    # Below: how the build runs, not what it produces (not part of the configuration hash).
    workers: int = 1
    strict: bool = False
    overwrite: bool = False
    commit_seconds: float = 30.0  # 0 commits after every batch (tests use it)
    batch_chars: int = 1 << 20  # ~1 MB of text per worker task
    progress: bool = True

    def validate(self) -> list[str]:
        problems = self.source.validate() + self.layout.validate() + self.examples.validate()
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.workers < 1:
            problems.append(f"--workers must be at least 1, got {self.workers}")
        if not self.commit_seconds >= 0:
            problems.append(f"--commit-seconds must be >= 0, got {self.commit_seconds}")
        return problems

    def content_config(self, inputs: Sequence[str], part: tuple[int, int] | None) -> dict[str, Any]:
        """Everything that decides the store's content: its hash guards resumes and reruns.
        A text store's configuration has no `examples` key, as before fine-tuning formats
        existed, so its hash (and the whole store) is unchanged."""
        config = {
            "inputs": list(inputs),
            "tokenizer": self.tokenizer,
            "val_fraction": self.val_fraction,
            "source": asdict(self.source),
            "layout": asdict(self.layout),
            "part": list(part) if part else None,
        }
        if self.examples.is_examples:
            config["examples"] = asdict(self.examples)
        return config


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def is_val(doc_id: str, val_fraction: float) -> bool:
    """Stable split: a document's side depends on its id alone, so it never moves."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h < val_fraction * 2**64


def _batches(records: Iterator[Record], batch_chars: int, on_skip) -> Iterator[tuple[list[Record], int]]:
    """Group documents into ~batch_chars batches; report skipped records as they pass.

    Yields (documents, records consumed including skipped ones).
    """
    docs: list[Record] = []
    chars = consumed = 0
    for rec in records:
        consumed += 1
        if rec.skip is not None:
            on_skip(rec)
            continue
        docs.append(rec)
        chars += rec.chars
        if chars >= batch_chars:
            yield docs, consumed
            docs, chars, consumed = [], 0, 0
    if docs or consumed:
        yield docs, consumed


class _SkipLog:
    """Counts skipped records by reason; logs file:line for the first few of each reason."""

    PER_REASON = 10

    def __init__(self, counts: dict[str, int], strict: bool):
        self.counts, self.strict = counts, strict

    def __call__(self, rec: Record) -> None:
        if self.strict:
            raise PrepError(f"{rec.where}: {rec.skip} (--strict stops on the first bad record)")
        reason = rec.skip.split(" (")[0]
        n = self.counts.get(reason, 0) + 1
        self.counts[reason] = n
        if n <= self.PER_REASON:
            log.warning("skipped %s: %s", rec.where, rec.skip)
        elif n == self.PER_REASON + 1:
            log.warning("more records skipped for %r; counting them silently", reason)


def _root_attrs(
    content: dict[str, Any], enc, dtype: np.dtype, ledger: Ledger, splits: dict[str, SplitState], complete: bool
) -> dict[str, Any]:
    attrs = {
        "format": FORMAT_NAME,
        "format_version": TEXT_FORMAT_VERSION,
        "complete": complete,
        "created_by": f"zeroforge {__version__}",
        "tokenizer": {"name": content["tokenizer"], "vocab_size": enc.n_vocab, "eot_id": enc.eot_token},
        "dtype": dtype.name,
        "sources": content["inputs"],
        "prep_config": content,
        "prep_config_hash": config_hash(content),
        "layout": content["layout"],
        "counts": {
            s: {"docs": st.n_docs, "tokens": st.tokens_flushed} for s, st in splits.items()
        },
        "segments": {s: [[0, 0, st.tokens_flushed]] for s, st in splits.items()},
        "checksums": {
            s: {"tokens": f"{st.tokens_crc:08x}", "doc_offsets": f"{st.offsets_crc:08x}"} for s, st in splits.items()
        },
        "skipped": {"total": sum(ledger.skipped.values()), "by_reason": dict(sorted(ledger.skipped.items()))},
        "text_bytes": ledger.text_bytes,
    }
    if "examples" in content:  # version 2: fine-tuning examples with their loss mask
        examples = ExampleOptions(**content["examples"])
        attrs["format_version"] = EXAMPLES_FORMAT_VERSION
        attrs["examples"] = examples.describe()
        for s, st in splits.items():
            attrs["counts"][s]["loss_tokens"] = st.loss_tokens
            attrs["checksums"][s][LOSS_MASK] = f"{st.mask_crc:08x}"
    return attrs


def _existing_config_hash(storage: Storage, build_dir: BuildDir) -> str | None:
    if build_dir.exists():
        return build_dir.config_hash()
    if storage.exists("zarr.json"):
        try:
            return json.loads(storage.read("zarr.json")).get("attributes", {}).get("prep_config_hash", "?")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return "?"
    return None


def build_store(
    inputs: Sequence[str],
    out: str | os.PathLike[str],
    options: PrepOptions = PrepOptions(),
    part: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Build (or resume, or confirm) the token store at `out` (a local path or
    s3://BUCKET/PREFIX). Returns the root attributes.

    `part=(i, k)` builds part i of k of the ordered input into `out` (see parts.py).
    """
    problems = options.validate()
    if problems:
        raise PrepError("; ".join(problems))
    if not inputs:
        raise PrepError("no inputs given")
    try:
        storage = open_storage(out)
    except StorageError as exc:
        raise PrepError(f"--out: {exc}") from None
    enc = get_encoding(options.tokenizer)
    units = expand_inputs(inputs)
    check_format(units, options.examples)
    if part is not None:
        units = partition(units, part[1])[part[0]]
    content = options.content_config(inputs, part)
    # Workers fork from here, before zarr or the S3 client start threads.
    with BatchEncoder(options.tokenizer, _usable_workers(options.workers),
                      options.examples.is_examples) as encoder:
        build_dir = BuildDir(storage)
        done = _check_existing(storage, build_dir, config_hash(content), options.overwrite)
        if done is not None:
            log.info("%s is already complete with these settings: nothing to do", storage.location)
            return done
        group, ledger, writers, held = _open_for_append(storage, build_dir, content, enc,
                                                        options.layout)
        router = _Router(writers, options.val_fraction, guarantee_val=part is None, held=held)
        if ledger.final_attrs is None:
            _run(units, options, encoder, ledger, router, build_dir)
    if ledger.final_attrs is None:
        router.finish()
        if sum(w.n_docs for w in writers.values()) == 0 and part is None:  # an empty part is fine
            storage.delete_prefix("")
            raise PrepError(f"no documents in {', '.join(inputs)} ({sum(ledger.skipped.values())} records skipped)")
        for w in writers.values():
            w.finish()
        final = {name: w.state() for name, w in writers.items()}
        attrs = _root_attrs(content, enc, token_dtype(enc.n_vocab), ledger, final, complete=True)
        build_dir.finish(ledger, attrs)
    # The completion flag goes last, after the finished ledger: a kill before this line leaves a
    # store readers refuse, and the rerun only writes this flag.
    group.attrs.update(ledger.final_attrs)
    build_dir.remove()
    return ledger.final_attrs


def _usable_workers(asked: int) -> int:
    """``--workers``, capped at the CPU cores this process may use: more processes only share
    the same cores (and memory), and the store is the same for any number of workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if asked > cores:
        log.warning("--workers %d is more than the %d CPU cores available; using %d", asked, cores,
                    cores)
        return cores
    return asked


def _check_existing(storage: Storage, build_dir: BuildDir, chash: str, overwrite: bool) -> dict[str, Any] | None:
    """The attributes of a complete store built with these settings (a no-op rerun), else None.

    Refuses an output built with other settings (unless overwrite) or one that is not a store.
    """
    existing = _existing_config_hash(storage, build_dir)
    if existing is not None and existing != chash:
        if not overwrite:
            raise PrepError(
                f"{storage.location}: exists and was built with other settings; pass --overwrite "
                "to replace it, or choose another --out"
            )
        storage.delete_prefix("")
        return None
    if existing is None:
        if not storage.is_empty():
            raise PrepError(f"{storage.location}: exists and is not a token store; choose another --out")
        return None
    if not build_dir.exists():
        attrs = json.loads(storage.read("zarr.json"))["attributes"]
        if attrs.get("complete"):
            return attrs
        # Killed before its first ledger was written: nothing was committed, start afresh.
    return None


def _open_for_append(storage: Storage, build_dir: BuildDir, content: dict[str, Any], enc, layout: Layout):
    """Create the store, or reopen an interrupted build truncated to its last commit."""
    dtype = token_dtype(enc.n_vocab)
    has_mask = "examples" in content
    held = None
    loaded = build_dir.load() if build_dir.exists() else None
    if loaded is None or (loaded[0].commit == 0 and loaded[0].final_attrs is None):
        ledger, tails = Ledger(config_hash(content), splits={s: SplitState() for s in SPLITS}), {}
        # mode="w" clears whatever an earlier attempt left, its commit-0 ledger included.
        group = zarr.open_group(storage.zarr_store(), mode="w", zarr_format=3)
        for name in SPLITS:
            create_split_arrays(group, name, dtype, layout, loss_mask=has_mask)
        group.attrs.update(_root_attrs(content, enc, dtype, ledger, ledger.splits, complete=False))
        # A kill before this ledger exists leaves complete=false and no ledger: rerun restarts.
        # Create-only: a second build that started at the same moment loses here.
        build_dir.write_initial(ledger)
    else:
        ledger, tails = loaded
        held = tails.pop(HELD, None)  # a document held back from train (_Router), if any
        # Claim the build before touching it: a build still running on it stops at its next
        # commit, and nothing it wrote past that commit counts.
        build_dir.take(ledger)
        group = zarr.open_group(storage.zarr_store(), mode="r+")
        if ledger.final_attrs is not None:  # finished: everything is in place but the flag
            return group, ledger, {}, None
        # zarr writes every local file as NAME.<uuid>.partial then renames it: a kill leaves the
        # temporary (objects on S3 appear whole or not at all).
        storage.delete([k for k in storage.list("") if k.endswith(".partial")])
        for name, st in ledger.splits.items():
            truncate_array(group[name]["tokens"], st.tokens_flushed, storage)
            truncate_array(group[name]["doc_offsets"], st.offsets_flushed, storage)
            if has_mask:
                truncate_array(group[name][LOSS_MASK], st.tokens_flushed, storage)
        log.info("resuming %s from commit %d (%d records done)", storage.location, ledger.commit,
                 ledger.records_done)
    writers = {
        name: SplitWriter(group, name, layout.shard_tokens, layout.offsets_shard, st, tails.get(name, {}))
        for name, st in ledger.splits.items()
    }
    return group, ledger, writers, held


def _run(
    units, options: PrepOptions, encoder: BatchEncoder, ledger: Ledger, router: _Router, build_dir: BuildDir
) -> None:
    records = read_records(units, options.source, options.examples)
    for _ in range(ledger.records_done):  # already committed: re-read, don't re-tokenize
        if next(records, None) is None:
            raise PrepError("the inputs have fewer records than the interrupted build consumed: "
                            "they changed since; pass --overwrite to rebuild")
    skip_log = _SkipLog(ledger.skipped, options.strict)
    total_bytes = sum(u.size for u in units) if all(u.size for u in units) else None
    progress = Progress(total_bytes, done_bytes=ledger.text_bytes, enabled=options.progress)
    batches = _batches(records, options.batch_chars, skip_log)
    # The consumed-record counts travel beside the encoder's output, in the same order.
    pending: list[tuple[list[Record], int]] = []

    def texts():
        for docs, consumed in batches:
            pending.append((docs, consumed))
            yield [list(d.pieces) if d.pieces is not None else d.text for d in docs]

    last_commit = time.monotonic()
    for encoded in encoder.map(texts()):
        docs, consumed = pending.pop(0)
        tokens, lengths, mask = encoded if len(encoded) == 3 else (*encoded, None)
        if mask is not None:
            docs, tokens, lengths, mask = _drop_long(docs, tokens, lengths, mask, options.examples,
                                                     skip_log)
        router.route(docs, tokens, lengths, mask)
        ledger.records_done += consumed
        nbytes = sum(_utf8_len(d) for d in docs)
        ledger.text_bytes += nbytes
        progress.update(len(docs), len(tokens), nbytes)
        if time.monotonic() - last_commit >= options.commit_seconds:
            build_dir.commit(ledger, router.writers, router.held)
            last_commit = time.monotonic()
    progress.close()


def _utf8_len(rec: Record) -> int:
    texts = [t for t, _ in rec.pieces] if rec.pieces is not None else [rec.text or ""]
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


def _drop_long(docs: list[Record], tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray,
               examples: ExampleOptions, skip_log: _SkipLog):
    """Skip (count, log; --strict: stop on) the examples longer than --max-tokens: the whole
    example for sft, either side for pairs (source; target with its EOT)."""
    ends = np.cumsum(lengths)
    starts = ends - lengths
    loss = np.add.reduceat(mask.astype(np.int64), starts) if len(docs) else np.zeros(0, np.int64)
    longest = np.maximum(lengths - loss, loss) if examples.format == "pairs" else lengths
    keep = longest <= examples.max_tokens
    if keep.all():
        return docs, tokens, lengths, mask
    for i in np.nonzero(~keep)[0]:
        side = "a side is " if examples.format == "pairs" else ""
        skip_log(Record(docs[i].id, None, docs[i].where,
                        f"longer than --max-tokens ({side}{int(longest[i])} > "
                        f"{examples.max_tokens} tokens)"))
    idx = np.nonzero(keep)[0]
    take = np.concatenate([np.arange(starts[i], ends[i]) for i in idx]) if len(idx) else \
        np.zeros(0, np.int64)
    return [docs[i] for i in idx], tokens[take], lengths[idx], mask[take]


class _Router:
    """Appends each document to its split, keeping input order within each split.

    A document goes to val when its id hashes below the val fraction. So that a corpus of more
    than one document never ends up without a val document (a small corpus may have none
    hashed there), the newest train document is held back while val is still empty: when the
    input ends with val empty, the held document (the corpus's last) goes to val instead. A
    multi-part build splits by hash only (``guarantee_val=False``): a part does not know
    whether another part has val documents. In a store of examples a document carries its
    loss mask everywhere it goes, the held-back one included.
    """

    def __init__(self, writers: dict[str, SplitWriter], val_fraction: float, guarantee_val: bool,
                 held: dict[str, np.ndarray] | None = None):
        self.writers, self.val_fraction = writers, val_fraction
        self.guarantee = guarantee_val and val_fraction > 0
        # The held-back document: {"tokens": ..., LOSS_MASK: ...}; saved with each commit.
        self.held = held

    def _holding(self) -> bool:
        return self.guarantee and self.writers["val"].n_docs == 0

    def route(self, docs: list[Record], tokens: np.ndarray, lengths: np.ndarray,
              loss_mask: np.ndarray | None = None) -> None:
        ends = np.cumsum(lengths)
        starts = ends - lengths
        side = np.fromiter((is_val(d.id, self.val_fraction) for d in docs), dtype=bool, count=len(docs))
        first = 0
        while first < len(docs) and self._holding():  # one document at a time until val has one
            doc = {"tokens": tokens[starts[first] : ends[first]]}
            if loss_mask is not None:
                doc[LOSS_MASK] = loss_mask[starts[first] : ends[first]]
            self._release()
            if side[first]:
                self._add("val", doc)
            else:
                self.held = doc
            first += 1
        for name, mask in (("train", ~side[first:]), ("val", side[first:])):
            if not mask.any():
                continue
            idx = first + np.nonzero(mask)[0]
            if mask.all():
                rest = slice(starts[first], None)
                self.writers[name].add(tokens[rest], lengths[first:],
                                       None if loss_mask is None else loss_mask[rest])
                continue
            take = np.concatenate([np.arange(starts[i], ends[i]) for i in idx])
            self.writers[name].add(tokens[take], lengths[idx],
                                   None if loss_mask is None else loss_mask[take])

    def _add(self, split: str, doc: dict[str, np.ndarray]) -> None:
        self.writers[split].add(doc["tokens"], np.array([len(doc["tokens"])]), doc.get(LOSS_MASK))

    def _release(self) -> None:
        if self.held is not None:
            self._add("train", self.held)
            self.held = None

    def finish(self) -> None:
        """The input has ended: the held document goes to val, unless it is the only one."""
        if self.held is not None and self.writers["train"].n_docs > 0:
            log.info("no document hashed to the val split; the last document goes there so that "
                     "the store has one")
            self._add("val", self.held)
            self.held = None
        self._release()
