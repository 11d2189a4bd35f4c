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
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import __version__
from .progress import Progress
from .sources import Record, SourceOptions, expand_inputs, partition, read_records
from .store import FORMAT_NAME, FORMAT_VERSION, SPLITS, Layout, create_split_arrays
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
    # Below: how the build runs, not what it produces (not part of the configuration hash).
    workers: int = 1
    strict: bool = False
    overwrite: bool = False
    commit_seconds: float = 30.0  # 0 commits after every batch (tests use it)
    batch_chars: int = 1 << 20  # ~1 MB of text per worker task
    progress: bool = True

    def validate(self) -> list[str]:
        problems = self.source.validate() + self.layout.validate()
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.workers < 1:
            problems.append(f"--workers must be at least 1, got {self.workers}")
        if not self.commit_seconds >= 0:
            problems.append(f"--commit-seconds must be >= 0, got {self.commit_seconds}")
        return problems

    def content_config(self, inputs: Sequence[str], part: tuple[int, int] | None) -> dict[str, Any]:
        """Everything that decides the store's content: its hash guards resumes and reruns."""
        return {
            "inputs": list(inputs),
            "tokenizer": self.tokenizer,
            "val_fraction": self.val_fraction,
            "source": asdict(self.source),
            "layout": asdict(self.layout),
            "part": list(part) if part else None,
        }


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
        chars += len(rec.text)
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
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
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


def _existing_config_hash(out: Path, build_dir: BuildDir) -> str | None:
    if build_dir.exists():
        return json.loads(build_dir.ledger_path.read_text()).get("config_hash")
    root = out / "zarr.json"
    if root.is_file():
        try:
            return json.loads(root.read_text()).get("attributes", {}).get("prep_config_hash", "?")
        except json.JSONDecodeError:
            return "?"
    return None


def build_store(
    inputs: Sequence[str],
    out: str | Path,
    options: PrepOptions = PrepOptions(),
    part: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Build (or resume, or confirm) the token store at `out`. Returns the root attributes.

    `part=(i, k)` builds part i of k of the ordered input into `out` (see parts.py).
    """
    problems = options.validate()
    if problems:
        raise PrepError("; ".join(problems))
    if not inputs:
        raise PrepError("no inputs given")
    out = Path(out)
    enc = get_encoding(options.tokenizer)
    units = expand_inputs(inputs)
    if part is not None:
        units = partition(units, part[1])[part[0]]
    content = options.content_config(inputs, part)
    build_dir = BuildDir(out)
    done = _check_existing(out, build_dir, config_hash(content), options.overwrite)
    if done is not None:
        log.info("%s is already complete with these settings: nothing to do", out)
        return done
    # Workers fork from here, before zarr starts its event-loop thread.
    with BatchEncoder(options.tokenizer, _usable_workers(options.workers)) as encoder:
        group, ledger, writers, held = _open_for_append(out, build_dir, content, enc, options.layout)
        router = _Router(writers, options.val_fraction, guarantee_val=part is None, held=held)
        _run(units, options, encoder, ledger, router, build_dir)
    router.finish()
    if sum(w.n_docs for w in writers.values()) == 0 and part is None:  # an empty part is fine
        shutil.rmtree(out, ignore_errors=True)
        raise PrepError(f"no documents in {', '.join(inputs)} ({sum(ledger.skipped.values())} records skipped)")
    for w in writers.values():
        w.finish()
    final = {name: w.state() for name, w in writers.items()}
    attrs = _root_attrs(content, enc, token_dtype(enc.n_vocab), ledger, final, complete=True)
    # The completion flag goes last: a kill before this line leaves a store readers refuse.
    group.attrs.update(attrs)
    build_dir.remove()
    return attrs


def _usable_workers(asked: int) -> int:
    """``--workers``, capped at the CPU cores this process may use: more processes only share
    the same cores (and memory), and the store is the same for any number of workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if asked > cores:
        log.warning("--workers %d is more than the %d CPU cores available; using %d", asked, cores,
                    cores)
        return cores
    return asked


def _check_existing(out: Path, build_dir: BuildDir, chash: str, overwrite: bool) -> dict[str, Any] | None:
    """The attributes of a complete store built with these settings (a no-op rerun), else None.

    Refuses an output built with other settings (unless overwrite) or one that is not a store.
    """
    existing = _existing_config_hash(out, build_dir)
    if existing is not None and existing != chash:
        if not overwrite:
            raise PrepError(
                f"{out}: exists and was built with other settings; pass --overwrite to replace it, "
                f"or choose another --out"
            )
        shutil.rmtree(out)
        return None
    if existing is None:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise PrepError(f"{out}: exists and is not a token store; choose another --out")
        return None
    if not build_dir.exists():
        attrs = json.loads((out / "zarr.json").read_text())["attributes"]
        if attrs.get("complete"):
            return attrs
        # Killed before its first ledger was written: nothing was committed, start afresh.
    return None


def _open_for_append(out: Path, build_dir: BuildDir, content: dict[str, Any], enc, layout: Layout):
    """Create the store, or reopen an interrupted build truncated to its last commit."""
    dtype = token_dtype(enc.n_vocab)
    held = None
    if not build_dir.exists() or build_dir.load()[0].commit == 0:
        out.mkdir(parents=True, exist_ok=True)
        ledger, tails = Ledger(config_hash(content), splits={s: SplitState() for s in SPLITS}), {}
        group = zarr.open_group(str(out), mode="w", zarr_format=3)
        for name in SPLITS:
            create_split_arrays(group, name, dtype, layout)
        group.attrs.update(_root_attrs(content, enc, dtype, ledger, ledger.splits, complete=False))
        # A kill before this ledger exists leaves complete=false and no ledger: rerun restarts.
        build_dir.write_initial(ledger)
    else:
        ledger, tails = build_dir.load()
        held = tails.pop(HELD, {}).get("tokens")
        # zarr writes every file as NAME.<uuid>.partial then renames it: a kill leaves the tmp.
        for torn in out.rglob("*.partial"):
            torn.unlink()
        group = zarr.open_group(str(out), mode="r+")
        for name, st in ledger.splits.items():
            truncate_array(group[name]["tokens"], st.tokens_flushed)
            truncate_array(group[name]["doc_offsets"], st.offsets_flushed)
        log.info("resuming %s from commit %d (%d records done)", out, ledger.commit, ledger.records_done)
    writers = {
        name: SplitWriter(group, name, layout.shard_tokens, layout.offsets_shard, st, tails.get(name, {}))
        for name, st in ledger.splits.items()
    }
    return group, ledger, writers, held


def _run(
    units, options: PrepOptions, encoder: BatchEncoder, ledger: Ledger, router: _Router, build_dir: BuildDir
) -> None:
    records = read_records(units, options.source)
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
            yield [d.text for d in docs]

    last_commit = time.monotonic()
    for tokens, lengths in encoder.map(texts()):
        docs, consumed = pending.pop(0)
        router.route(docs, tokens, lengths)
        ledger.records_done += consumed
        nbytes = sum(len(d.text.encode("utf-8", "surrogatepass")) for d in docs)
        ledger.text_bytes += nbytes
        progress.update(len(docs), len(tokens), nbytes)
        if time.monotonic() - last_commit >= options.commit_seconds:
            build_dir.commit(ledger, router.writers, router.held)
            last_commit = time.monotonic()
    progress.close()


class _Router:
    """Appends each document to its split, keeping input order within each split.

    A document goes to val when its id hashes below the val fraction. So that a corpus of more
    than one document never ends up without a val document (a small corpus may have none
    hashed there), the newest train document is held back while val is still empty: when the
    input ends with val empty, the held document (the corpus's last) goes to val instead. A
    multi-part build splits by hash only (``guarantee_val=False``): a part does not know
    whether another part has val documents.
    """

    def __init__(self, writers: dict[str, SplitWriter], val_fraction: float, guarantee_val: bool,
                 held: np.ndarray | None = None):
        self.writers, self.val_fraction = writers, val_fraction
        self.guarantee = guarantee_val and val_fraction > 0
        self.held = held  # tokens of the held-back document; saved with each commit

    def _holding(self) -> bool:
        return self.guarantee and self.writers["val"].n_docs == 0

    def route(self, docs: list[Record], tokens: np.ndarray, lengths: np.ndarray) -> None:
        ends = np.cumsum(lengths)
        starts = ends - lengths
        side = np.fromiter((is_val(d.id, self.val_fraction) for d in docs), dtype=bool, count=len(docs))
        first = 0
        while first < len(docs) and self._holding():  # one document at a time until val has one
            doc = tokens[starts[first] : ends[first]]
            self._release()
            if side[first]:
                self.writers["val"].add(doc, lengths[first : first + 1])
            else:
                self.held = doc
            first += 1
        for name, mask in (("train", ~side[first:]), ("val", side[first:])):
            if not mask.any():
                continue
            idx = first + np.nonzero(mask)[0]
            if mask.all():
                self.writers[name].add(tokens[starts[first] :], lengths[first:])
                continue
            pieces = [tokens[starts[i] : ends[i]] for i in idx]
            self.writers[name].add(np.concatenate(pieces), lengths[idx])

    def _release(self) -> None:
        if self.held is not None:
            self.writers["train"].add(self.held, np.array([len(self.held)]))
            self.held = None

    def finish(self) -> None:
        """The input has ended: the held document goes to val, unless it is the only one."""
        if self.held is not None and self.writers["train"].n_docs > 0:
            log.info("no document hashed to the val split; the last document goes there so that "
                     "the store has one")
            self.writers["val"].add(self.held, np.array([len(self.held)]))
            self.held = None
        self._release()
