"""Corpora as one ordered stream of documents with stable ids.

Inputs expand into *units* (one file, one Hugging Face dataset, one builtin corpus) in a fixed
order: inputs as given, directories and globs in sorted order. Each unit yields records in file
order. A record that cannot become a document (malformed JSON, invalid UTF-8, missing or empty
text, ...) is yielded with `skip` set instead of raising, so the builder can count it, log it
with its file:line, or stop on it under --strict.

Document ids never depend on a document's global position, only on where it lives inside its
unit (or on the record's own id field), so the train/val split by id hash is stable when the
corpus grows and a multi-part build sees the same ids as a single build.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import zstandard

from .examples import ExampleOptions, Piece, parse_example
from .pydoc_qa import pydoc_qa
from .storage import url_scheme

BUILTIN_CORPORA = ("builtin:pydoc-topics", "builtin:stdlib", "builtin:pydoc-qa")
# Units whose records are plain text, not fields: they cannot hold fine-tuning examples.
_TEXT_ONLY_KINDS = ("text", "pydoc-topics")
TEXT_MODES = ("file", "paragraph", "line")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".jsonl.zst", ".jsonl.bz2", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
_BOM = b"\xef\xbb\xbf"


class SourceError(ValueError):
    """An input that cannot be read at all (missing file, unreadable dataset, empty glob)."""


@dataclass(frozen=True)
class SourceOptions:
    text_mode: str = "file"  # plain text: one document per file | per blank-line paragraph | per line
    text_field: str = "text"  # JSONL / Parquet / HF column with the document text
    id_field: str = "id"  # used as the document id when present
    hf_split: str = "train"
    hf_streaming: bool = False

    def validate(self) -> list[str]:
        problems = []
        if self.text_mode not in TEXT_MODES:
            problems.append(f"--text-mode must be one of {', '.join(TEXT_MODES)}, got {self.text_mode!r}")
        if not self.text_field:
            problems.append("--text-field must not be empty")
        return problems


@dataclass(frozen=True)
class Unit:
    """One readable piece of input, in the order it is read."""

    kind: str  # text | jsonl | parquet | hf-hub | hf-disk | pydoc-topics | pydoc-qa
    location: str  # path, or dataset name for hf-hub
    name: str  # id prefix: path relative to the input's root, or the dataset name
    size: int  # bytes on disk (0 when unknown)
    config: str | None = None  # hf-hub dataset configuration


@dataclass(frozen=True)
class Record:
    id: str
    text: str | None  # None when skipped, and for fine-tuning examples
    where: str  # "file:line" for messages
    skip: str | None = None  # why the record is not a document
    pieces: tuple[Piece, ...] | None = None  # a fine-tuning example (examples.py)

    @property
    def chars(self) -> int:
        if self.pieces is not None:
            return sum(len(t) for t, _ in self.pieces)
        return len(self.text or "")


# --- expanding inputs into units -----------------------------------------------------------------
def _file_kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _is_saved_hf_dataset(path: Path) -> bool:
    # `Dataset.save_to_disk` writes these next to its arrow files; a DatasetDict writes
    # dataset_dict.json above one such directory per split.
    if (path / "dataset_dict.json").is_file():
        return True
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _file_unit(path: Path, root: Path) -> Unit:
    return Unit(_file_kind(path.name), str(path), path.relative_to(root).as_posix(), path.stat().st_size)


def _walk_sorted(directory: Path, skip_dirs: tuple[str, ...] = ()) -> list[Path]:
    """Files under `directory` in sorted relative-path order, hidden entries left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        rel = os.path.relpath(dirpath, directory)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        found.extend((prefix + f, os.path.join(dirpath, f)) for f in filenames if not f.startswith("."))
    return [Path(full) for _, full in sorted(found)]


def _stdlib_units() -> list[Unit]:
    root = Path(sysconfig.get_paths()["stdlib"])
    units = []
    for path in _walk_sorted(root, skip_dirs=("site-packages", "__pycache__")):
        if path.suffix == ".py":
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            units.append(Unit("text", str(path), "stdlib/" + rel, path.stat().st_size))
    return units


def expand_inputs(inputs: Sequence[str]) -> list[Unit]:
    """Units in read order. Raises SourceError naming the first input that does not exist."""
    units: list[Unit] = []
    for item in inputs:
        if item == "builtin:pydoc-topics":
            units.append(Unit("pydoc-topics", item, "pydoc-topics", 0))
        elif item == "builtin:pydoc-qa":
            units.append(Unit("pydoc-qa", item, "pydoc-qa", 0))
        elif item == "builtin:stdlib":
            units.extend(_stdlib_units())
        elif item.startswith("builtin:"):
            raise SourceError(f"{item}: unknown builtin corpus; choose one of {', '.join(BUILTIN_CORPORA)}")
        elif item.startswith("hf:"):
            name, _, config = item[3:].partition(":")
            if not name:
                raise SourceError(f"{item}: expected hf:NAME[:CONFIG]")
            units.append(Unit("hf-hub", name, name, 0, config or None))
        elif url_scheme(item) is not None:  # never read as the local path "s3:/b/x"
            raise SourceError(f"{item}: inputs are read from local paths, not URLs; copy the "
                              "corpus here first (or use hf:NAME for a Hugging Face dataset)")
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                raise SourceError(f"{item}: no files match this pattern")
            root = Path(item.split("*")[0].split("?")[0].split("[")[0] or ".")
            root = root if root.is_dir() else root.parent
            units.extend(_file_unit(f, root) for f in files)
        else:
            path = Path(item)
            if path.is_dir() and _is_saved_hf_dataset(path):
                units.append(Unit("hf-disk", str(path), path.name, 0))
            elif path.is_dir():
                files = _walk_sorted(path)
                if not files:
                    raise SourceError(f"{item}: directory has no files")
                units.extend(_file_unit(f, path.parent) for f in files)
            elif path.is_file():
                units.append(_file_unit(path, path.parent))
            else:
                raise SourceError(f"{item}: no such file or directory")
    return units


def check_format(units: Sequence[Unit], examples: ExampleOptions) -> None:
    """Refuse plain-text inputs for a fine-tuning format before anything is built."""
    if not examples.is_examples:
        return
    for unit in units:
        if unit.kind in _TEXT_ONLY_KINDS:
            raise SourceError(f"{unit.location}: --format {examples.format} reads records with "
                              "fields (JSONL, Parquet, Hugging Face datasets, builtin:pydoc-qa), "
                              "not plain text")


def partition(units: Sequence[Unit], num_parts: int) -> list[list[Unit]]:
    """Split units into `num_parts` contiguous runs of roughly equal size on disk.

    Contiguity is what lets the stitched parts equal a single build: part k's documents all come
    before part k+1's. Units of unknown size count as one byte.
    """
    sizes = [max(u.size, 1) for u in units]
    total = sum(sizes)
    parts: list[list[Unit]] = [[] for _ in range(num_parts)]
    done = 0
    for unit, size in zip(units, sizes, strict=True):
        # Assign by the unit's midpoint so a big unit lands in the part that holds most of it.
        k = min(num_parts - 1, int((done + size / 2) * num_parts / total))
        parts[k].append(unit)
        done += size
    return parts


# --- reading units ---------------------------------------------------------------------------------
def _decode(raw: bytes, where: str) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 (at byte {exc.start})"


def _text_record(doc_id: str, where: str, text: str | None, skip: str | None) -> Record:
    if skip is None and (text is None or not text.strip()):
        skip = "empty text"
    return Record(doc_id, text if skip is None else None, where, skip)


def _read_text(unit: Unit, mode: str) -> Iterator[Record]:
    with open(unit.location, "rb") as f:
        data = f.read()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    if mode == "file":
        text, skip = _decode(data, unit.location)
        yield _text_record(unit.name, f"{unit.location}:1", text, skip)
        return
    lines = data.split(b"\n")
    if mode == "line":
        for lineno, raw in enumerate(lines, 1):
            if not raw.strip():
                continue  # blank lines separate nothing in line mode: not records
            text, skip = _decode(raw.rstrip(b"\r"), unit.location)
            yield _text_record(f"{unit.name}:{lineno}", f"{unit.location}:{lineno}", text, skip)
        return
    start, block = 0, []  # paragraph mode: runs of non-blank lines
    for lineno, raw in enumerate(lines + [b""], 1):
        if raw.strip():
            if not block:
                start = lineno
            block.append(raw.rstrip(b"\r"))
        elif block:
            text, skip = _decode(b"\n".join(block), unit.location)
            yield _text_record(f"{unit.name}:{start}", f"{unit.location}:{start}", text, skip)
            block = []


class _ZstdReader(io.RawIOBase):
    """A .zst file decompressed frame after frame. Unlike zstandard's ``stream_reader``, which
    just ends early, a truncated file raises EOFError (as gzip and bz2 do)."""

    CHUNK = 1 << 16  # compressed bytes per step: bounds the output held at once

    def __init__(self, path: str):
        self._file = open(path, "rb")  # noqa: SIM115 -- closed in close()
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._in_frame = False
        self._pending, self._out = b"", b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            chunk, self._pending = self._pending or self._file.read(self.CHUNK), b""
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            if self._frame.eof:
                self._frame = self._dctx.decompressobj()
            self._in_frame = True
            self._out = self._frame.decompress(chunk)
            if self._frame.eof:  # the frame is complete; what follows starts the next one
                self._in_frame, self._pending = False, self._frame.unused_data
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_jsonl(path: str) -> io.BufferedIOBase:
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith(".bz2"):
        return bz2.open(path, "rb")
    if lower.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path))
    return open(path, "rb")


def _from_mapping(obj: object, doc_id: str, where: str, opts: SourceOptions,
                  examples: ExampleOptions | None = None) -> Record:
    if not isinstance(obj, dict):
        return Record(doc_id, None, where, f"not a JSON object ({type(obj).__name__})")
    if opts.id_field in obj and obj[opts.id_field] is not None:
        doc_id = f"id:{obj[opts.id_field]}"
    if examples is not None and examples.is_examples:
        pieces, skip = parse_example(obj, examples)
        return Record(doc_id, None, where, skip, tuple(pieces) if pieces else None)
    if opts.text_field not in obj:
        return Record(doc_id, None, where, f"missing field {opts.text_field!r}")
    text = obj[opts.text_field]
    if text is None:
        return Record(doc_id, None, where, f"field {opts.text_field!r} is null")
    if not isinstance(text, str):
        return Record(doc_id, None, where, f"field {opts.text_field!r} is {type(text).__name__}, not a string")
    return _text_record(doc_id, where, text, None)


def _read_jsonl(unit: Unit, opts: SourceOptions, examples: ExampleOptions | None
                ) -> Iterator[Record]:
    lines_read = [0]
    try:
        yield from _jsonl_records(unit, opts, examples, lines_read)
    except (EOFError, OSError, zlib.error, zstandard.ZstdError) as exc:
        # A truncated or damaged compressed file: the input itself is bad (a rerun reads the
        # same bytes again), so say which file and where its readable lines end.
        raise SourceError(f"{unit.location}:{lines_read[0] + 1}: cannot be read ({exc}); the "
                          f"file is truncated or corrupt after line {lines_read[0]}: fix or "
                          "replace it") from None


def _jsonl_records(unit: Unit, opts: SourceOptions, examples: ExampleOptions | None,
                   lines_read: list[int]) -> Iterator[Record]:
    with _open_jsonl(unit.location) as f:
        reader = io.BufferedReader(f) if not isinstance(f, io.BufferedReader) else f
        for lineno, raw in enumerate(reader, 1):
            lines_read[0] = lineno
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if not raw.strip():
                continue
            where, doc_id = f"{unit.location}:{lineno}", f"{unit.name}:{lineno}"
            line, skip = _decode(raw, where)
            if skip:
                yield Record(doc_id, None, where, skip)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Record(doc_id, None, where, f"malformed JSON ({exc.msg} at column {exc.colno})")
                continue
            yield _from_mapping(obj, doc_id, where, opts, examples)


def _read_parquet(unit: Unit, opts: SourceOptions, examples: ExampleOptions | None
                  ) -> Iterator[Record]:
    try:
        pf = pq.ParquetFile(unit.location)
    except Exception as exc:
        raise SourceError(f"{unit.location}: not a readable Parquet file ({exc})") from exc
    names = pf.schema_arrow.names
    wanted = examples.fields() if examples is not None and examples.is_examples else [opts.text_field]
    if not set(wanted) & set(names):
        raise SourceError(f"{unit.location}: no column {' or '.join(map(repr, wanted))} "
                          f"(columns: {', '.join(names)})")
    columns = [c for c in wanted if c in names] + ([opts.id_field] if opts.id_field in names else [])
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=4096):
        for obj in batch.to_pylist():
            yield _from_mapping(obj, f"{unit.name}:{row}", f"{unit.location}:row {row}", opts,
                                examples)
            row += 1


def _read_hf(unit: Unit, opts: SourceOptions, examples: ExampleOptions | None
             ) -> Iterator[Record]:
    import datasets  # 0.5 s to import; only Hugging Face inputs need it

    try:
        if unit.kind == "hf-disk":
            ds = datasets.load_from_disk(unit.location)
            if isinstance(ds, datasets.DatasetDict):
                if opts.hf_split not in ds:
                    raise SourceError(f"{unit.location}: no split {opts.hf_split!r} (has {', '.join(ds)})")
                ds = ds[opts.hf_split]
        else:
            ds = datasets.load_dataset(
                unit.location, unit.config, split=opts.hf_split, streaming=opts.hf_streaming
            )
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"hf:{unit.location}: cannot load dataset ({type(exc).__name__}: {exc})") from exc
    label = f"hf:{unit.name}" + (f":{unit.config}" if unit.config else "") + f"[{opts.hf_split}]"
    for i, obj in enumerate(ds):
        yield _from_mapping(obj, f"{label}:{i}", f"{label} row {i}", opts, examples)


def _read_pydoc_topics(unit: Unit) -> Iterator[Record]:
    from pydoc_data.topics import topics  # 0.5 MB of text, only for this corpus

    for key in sorted(topics):
        yield _text_record(f"pydoc-topics/{key}", f"pydoc-topics:{key}", topics[key], None)


def _read_pydoc_qa(unit: Unit, opts: SourceOptions, examples: ExampleOptions | None
                   ) -> Iterator[Record]:
    for doc_id, obj in pydoc_qa():
        yield _from_mapping(obj, doc_id, f"{unit.location}:{doc_id}", opts, examples)


def read_unit(unit: Unit, opts: SourceOptions, examples: ExampleOptions | None = None
              ) -> Iterator[Record]:
    """The records of one unit; with a fine-tuning ``examples`` format they carry pieces."""
    if unit.kind == "text":
        return _read_text(unit, opts.text_mode)
    if unit.kind == "jsonl":
        return _read_jsonl(unit, opts, examples)
    if unit.kind == "parquet":
        return _read_parquet(unit, opts, examples)
    if unit.kind in ("hf-hub", "hf-disk"):
        return _read_hf(unit, opts, examples)
    if unit.kind == "pydoc-topics":
        return _read_pydoc_topics(unit)
    if unit.kind == "pydoc-qa":
        return _read_pydoc_qa(unit, opts, examples)
    raise AssertionError(f"unknown unit kind {unit.kind}")


def read_records(units: Sequence[Unit], opts: SourceOptions,
                 examples: ExampleOptions | None = None) -> Iterator[Record]:
    """Every record of every unit, in order."""
    for unit in units:
        yield from read_unit(unit, opts, examples)
