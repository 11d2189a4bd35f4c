"""Fixtures and helpers for the data_prep tests: tiny real corpora and real token stores.

Every store here uses a tiny layout (4096-token shards of 512-token chunks) so that even a few
kilobytes of text span many shard files and chunk boundaries.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from zeroforge.data_prep.build import PrepOptions, build_store
from zeroforge.data_prep.sources import SourceOptions
from zeroforge.data_prep.store import Layout
from zeroforge.data_prep.tokenize import get_encoding

REPO = Path(__file__).resolve().parents[2]
EOT = 50256
TINY = Layout(shard_tokens=4096, chunk_tokens=512, offsets_shard=1024, offsets_chunk=256)
TINY_CLI = ["--shard-tokens", "4096", "--chunk-tokens", "512", "--no-progress"]

# Words with some variety for the BPE: plain, capitalised, punctuation, digits, non-ASCII, and
# the literal special-token text that must stay ordinary text.
WORDS = (
    "the of and to in is was for on that with as by at from his her river stone quantum "
    "Zebra Alpha Beta gamma delta, epsilon. 1984 3.14159 naïve café Ωmega 東京 🙂 -- "
    "(parenthesis) [bracket] don't it's <|endoftext|> <|endoftext|>x"
).split()


def opts(**kw) -> PrepOptions:
    """PrepOptions with the tiny layout and no progress output; `text_mode` etc. go to source."""
    source_keys = {"text_mode", "text_field", "id_field", "hf_split", "hf_streaming"}
    source = SourceOptions(**{k: kw.pop(k) for k in list(kw) if k in source_keys})
    kw.setdefault("layout", TINY)
    kw.setdefault("progress", False)
    kw.setdefault("val_fraction", 0.0)  # every document in train unless a test asks for val
    return PrepOptions(source=source, **kw)


def sentence(rng: random.Random, lo: int = 3, hi: int = 60) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def is_val(doc_id: str, fraction: float) -> bool:
    """The documented split rule, written out independently: blake2b-64 of the id < fraction."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h < fraction * 2**64


@dataclass
class Corpus:
    """Plain-text files of blank-line separated paragraphs and the documents they hold."""

    root: Path  # the directory given as input
    docs: list[tuple[str, str]]  # (id in paragraph mode, text) in read order

    def expected(self, val_fraction: float) -> dict[str, list[np.ndarray]]:
        """tiktoken's encoding + EOT of every document, per split, in input order."""
        enc = get_encoding("gpt2")
        out: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        for doc_id, text in self.docs:
            ids = enc.encode_ordinary(text) + [EOT]
            out["val" if is_val(doc_id, val_fraction) else "train"].append(np.array(ids))
        return out


def write_paragraph_corpus(
    root: Path, seed: int, n_files: int, paragraphs: tuple[int, int]
) -> Corpus:
    """`n_files` text files under `root` (created in reverse order, so the directory listing
    order differs from the sorted order the reader must use)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for i in reversed(range(n_files)):
        lines: list[str] = []
        docs = []
        for _ in range(rng.randint(*paragraphs)):
            start = len(lines) + 1
            para = [sentence(rng) for _ in range(rng.randint(1, 3))]
            lines.extend(para)
            lines.append("")
            docs.append((start, "\n".join(para)))
        files[i] = (lines, docs)
        (root / f"doc_{i:02d}.txt").write_text("\n".join(lines), encoding="utf-8")
    docs = [
        (f"{root.name}/doc_{i:02d}.txt:{start}", text)
        for i in range(n_files)
        for start, text in files[i][1]
    ]
    return Corpus(root, docs)


def store_digest(path: str | Path) -> str:
    """sha256 over every file's relative path and bytes: equal digests = byte-identical stores."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def store_files(path: str | Path) -> list[str]:
    path = Path(path)
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def read_all_docs(split) -> list[np.ndarray]:
    return [split.doc(i) for i in range(split.n_docs)]


def assert_docs_equal(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> None:
    assert len(got) == len(want), f"{len(got)} documents, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert np.array_equal(np.asarray(g, dtype=np.int64), np.asarray(w, dtype=np.int64)), (
            f"document {i} differs"
        )


def root_attrs(store: str | Path) -> dict:
    return json.loads((Path(store) / "zarr.json").read_text())["attributes"]


def set_root_attrs(store: str | Path, **changes) -> None:
    meta_path = Path(store) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"].update(changes)
    meta_path.write_text(json.dumps(meta))


# --- shard surgery: the on-disk sharding layout is zarr's (data chunks, then an index of
# (offset, nbytes) uint64 pairs per chunk with a CRC-32C of the index at the end) ------------------
MISSING = 2**64 - 1


def shard_index(path: Path, n_chunks: int) -> np.ndarray:
    data = path.read_bytes()
    raw = data[len(data) - (n_chunks * 16 + 4) : len(data) - 4]
    return np.frombuffer(raw, dtype="<u8").reshape(n_chunks, 2).copy()


def write_shard_index(path: Path, index: np.ndarray) -> None:
    import google_crc32c

    data = bytearray(path.read_bytes())
    raw = index.astype("<u8").tobytes()
    start = len(data) - (len(raw) + 4)
    data[start : start + len(raw)] = raw
    data[start + len(raw) :] = google_crc32c.value(raw).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def fix_chunk_crc(path: Path, n_chunks: int, chunk: int) -> None:
    """Recompute the CRC-32C of one inner chunk (so only a whole-array checksum can notice)."""
    import google_crc32c

    offset, nbytes = (int(x) for x in shard_index(path, n_chunks)[chunk])
    data = bytearray(path.read_bytes())
    body = bytes(data[offset : offset + nbytes - 4])
    data[offset + nbytes - 4 : offset + nbytes] = google_crc32c.value(body).to_bytes(4, "little")
    path.write_bytes(bytes(data))


# --- command line ---------------------------------------------------------------------------------
@dataclass
class CliResult:
    rc: int
    out: str
    err: str
    log: str  # log records emitted during the call (the CLI logs through `logging`)

    @property
    def text(self) -> str:
        return self.out + self.err + self.log


@pytest.fixture
def zf(capsys, caplog) -> Callable[..., CliResult]:
    """Run `zeroforge ARGS...` in this process (no interpreter start-up: fast)."""
    import logging

    from zeroforge.launch.cli import main

    def run(*argv: str) -> CliResult:
        capsys.readouterr()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as exc:  # argparse errors and --help
                rc = exc.code if isinstance(exc.code, int) else 1
        cap = capsys.readouterr()
        return CliResult(rc, cap.out, cap.err, caplog.text)

    return run


def zeroforge_cmd() -> list[str]:
    """The installed console script when present, else the module (same entry point)."""
    script = Path(sys.executable).parent / "zeroforge"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "zeroforge.launch"]


def zf_subprocess(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*zeroforge_cmd(), *map(str, argv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- shared stores --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    """~200 KB of paragraphs in 6 files: ~45k tokens, several 4096-token shards per split."""
    return write_paragraph_corpus(
        tmp_path_factory.mktemp("corpus") / "corpus", seed=1, n_files=6, paragraphs=(60, 100)
    )


VAL_FRACTION = 0.3


@pytest.fixture(scope="session")
def built_store(corpus, tmp_path_factory) -> Path:
    """A complete store of `corpus` (paragraph mode, 30% val). Read-only: copy before corrupting."""
    out = tmp_path_factory.mktemp("stores") / "store"
    build_store([str(corpus.root)], out, opts(val_fraction=VAL_FRACTION, text_mode="paragraph"))
    return out


@pytest.fixture
def store_copy(built_store, tmp_path) -> Path:
    """A private copy of `built_store` that a test may damage."""
    dst = tmp_path / "store"
    shutil.copytree(built_store, dst)
    return dst
