"""data_prep/build.py end to end: real corpora in, real stores out, read back through TokenStore."""

from __future__ import annotations

import gzip
import json
import logging
import os

import numpy as np
import pytest
from zeroforge.data_prep.build import PrepError, build_store
from zeroforge.data_prep.store import Layout, TokenStore
from zeroforge.data_prep.tokenize import get_encoding

from .conftest import (
    EOT,
    TINY,
    VAL_FRACTION,
    assert_docs_equal,
    is_val,
    opts,
    read_all_docs,
    root_attrs,
    store_digest,
    store_files,
    write_paragraph_corpus,
)


def test_store_holds_tiktoken_encoding_plus_eot_of_every_document(built_store, corpus):
    store = TokenStore.open(built_store)
    want = corpus.expected(VAL_FRACTION)
    assert store.tokenizer == "gpt2" and store.vocab_size == 50257 and store.eot_id == EOT
    assert store.dtype == np.uint16
    assert store.splits == ("train", "val")
    assert len(want["val"]) > 10 and len(want["train"]) > 10
    for name in ("train", "val"):
        split = store.split(name)
        got = read_all_docs(split)
        assert_docs_equal(got, want[name])
        assert split.n_docs == len(want[name])
        assert split.n_tokens == sum(len(d) for d in want[name])
        off = split.doc_offsets
        assert off.dtype == np.int64 and off[0] == 0 and off[-1] == split.n_tokens
        assert np.array_equal(np.diff(off), [len(d) for d in want[name]])
        everything = split.tokens(0, split.n_tokens)
        assert everything.dtype == np.uint16
        # EOT only where documents end: literal "<|endoftext|>" in the corpus stayed text.
        assert np.array_equal(np.nonzero(everything == EOT)[0], off[1:] - 1)
    # The tiny layout really does give many shards (what the reader tests rely on).
    assert store.split("train").n_tokens > 4 * TINY.shard_tokens
    store.close()


def test_literal_special_token_text_is_in_the_corpus(corpus):
    assert any("<|endoftext|>" in text for _, text in corpus.docs)


def test_root_attributes_describe_the_store(built_store, corpus):
    attrs = root_attrs(built_store)
    assert attrs["format"] == "zeroforge-token-store" and attrs["format_version"] == 1
    assert attrs["complete"] is True
    assert attrs["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "eot_id": EOT}
    assert attrs["dtype"] == "uint16"
    assert attrs["sources"] == [str(corpus.root)]
    assert attrs["prep_config"]["val_fraction"] == VAL_FRACTION
    assert attrs["prep_config"]["source"]["text_mode"] == "paragraph"
    assert len(attrs["prep_config_hash"]) == 64
    assert attrs["skipped"] == {"total": 0, "by_reason": {}}
    assert attrs["layout"]["shard_tokens"] == TINY.shard_tokens
    total = sum(len(t.encode()) for _, t in corpus.docs)
    assert attrs["text_bytes"] == total
    assert not (built_store / "_build").exists()


# --- every source format through a real build -------------------------------------------------------
TEXTS = [
    "The first document, with ünïcödé and a literal <|endoftext|> inside.",
    "Second one.\nTwo lines.",
    "  leading and trailing spaces are kept  ",
    "東京 🙂 " * 40,
    "short",
]


def _write_format(tmp_path, fmt: str) -> tuple[str, dict]:
    rows = [{"text": t} for t in TEXTS]
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt == "jsonl":
        (tmp_path / "d.jsonl").write_bytes(lines)
        return str(tmp_path / "d.jsonl"), {}
    if fmt == "jsonl.gz":
        (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(lines))
        return str(tmp_path / "d.jsonl.gz"), {}
    if fmt == "jsonl.zst":
        import zstandard

        (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
        return str(tmp_path / "d.jsonl.zst"), {}
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": TEXTS}), tmp_path / "d.parquet", row_group_size=2)
        return str(tmp_path / "d.parquet"), {}
    if fmt == "hf-disk":
        import datasets

        datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "saved"))
        return str(tmp_path / "saved"), {}
    if fmt == "hf-dir":
        (tmp_path / "j").mkdir()
        (tmp_path / "j" / "a.jsonl").write_bytes(lines)
        return f"hf:{tmp_path / 'j'}", {}
    if fmt == "hf-dir-streaming":
        (tmp_path / "j").mkdir()
        (tmp_path / "j" / "a.jsonl").write_bytes(lines)
        return f"hf:{tmp_path / 'j'}", {"hf_streaming": True}
    if fmt == "hf-dict-validation":
        import datasets

        datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_dict({"text": ["not this split"]}),
                "validation": datasets.Dataset.from_dict({"text": TEXTS}),
            }
        ).save_to_disk(str(tmp_path / "dd"))
        return str(tmp_path / "dd"), {"hf_split": "validation"}
    if fmt == "text-line":
        (tmp_path / "d.txt").write_text("\n".join(t.replace("\n", " ") for t in TEXTS))
        return str(tmp_path / "d.txt"), {"text_mode": "line"}
    raise AssertionError(fmt)


FORMATS = [
    "jsonl",
    "jsonl.gz",
    "jsonl.zst",
    "parquet",
    "hf-disk",
    "hf-dict-validation",
    "hf-dir",
    "hf-dir-streaming",
    "text-line",
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_builds_a_store_equal_to_tiktoken(tmp_path, fmt):
    src, kw = _write_format(tmp_path, fmt)
    build_store([src], tmp_path / "store", opts(**kw))
    enc = get_encoding("gpt2")
    texts = [t.replace("\n", " ") for t in TEXTS] if fmt == "text-line" else TEXTS
    want = [enc.encode_ordinary(t) + [EOT] for t in texts]
    split = TokenStore.open(tmp_path / "store").split("train")
    assert_docs_equal(read_all_docs(split), want)


def test_builtin_pydoc_topics_builds(tmp_path):
    from pydoc_data.topics import topics

    build_store(
        ["builtin:pydoc-topics"],
        tmp_path / "s",
        opts(layout=Layout(shard_tokens=65536, chunk_tokens=4096)),
    )
    enc = get_encoding("gpt2")
    want = [enc.encode_ordinary(topics[k]) + [EOT] for k in sorted(topics) if topics[k].strip()]
    assert_docs_equal(read_all_docs(TokenStore.open(tmp_path / "s").split("train")), want)


# --- determinism ----------------------------------------------------------------------------------
def test_worker_count_does_not_change_a_single_byte(corpus, built_store, tmp_path):
    """workers=2 (spawned tokenizer processes, small batches so both work) gives the very files
    workers=1 gives."""
    for workers in (1, 2):
        build_store(
            [str(corpus.root)],
            tmp_path / f"w{workers}",
            opts(
                val_fraction=VAL_FRACTION, text_mode="paragraph", workers=workers, batch_chars=4000
            ),
        )
    assert store_files(tmp_path / "w1") == store_files(built_store)
    assert (
        store_digest(tmp_path / "w1") == store_digest(tmp_path / "w2") == store_digest(built_store)
    )


def test_rerun_on_a_complete_store_is_a_noop(corpus, tmp_path, caplog):
    out = tmp_path / "s"
    o = opts(val_fraction=VAL_FRACTION, text_mode="paragraph")
    first = build_store([str(corpus.root)], out, o)
    before = {p: os.stat(out / p).st_mtime_ns for p in store_files(out)}
    digest = store_digest(out)
    with caplog.at_level(logging.INFO, logger="zeroforge.data_prep"):
        again = build_store([str(corpus.root)], out, o)
    assert "already complete" in caplog.text and "nothing to do" in caplog.text
    assert again == first
    assert store_digest(out) == digest
    assert {p: os.stat(out / p).st_mtime_ns for p in store_files(out)} == before


def test_val_split_is_stable_when_the_corpus_grows(tmp_path):
    """A document's split depends on its id alone: adding files keeps every old document on
    its side, and the old documents keep their relative order."""
    root = tmp_path / "c"
    small = write_paragraph_corpus(root, seed=5, n_files=3, paragraphs=(15, 25))
    build_store([str(root)], tmp_path / "small", opts(val_fraction=0.5, text_mode="paragraph"))
    grown = write_paragraph_corpus(tmp_path / "extra" / "c", seed=6, n_files=5, paragraphs=(15, 25))
    # Same directory name, more files: doc_00..02 are unchanged, doc_03/04 are new.
    for name in ("doc_03.txt", "doc_04.txt"):
        os.replace(grown.root / name, root / name)
    build_store([str(root)], tmp_path / "grown", opts(val_fraction=0.5, text_mode="paragraph"))
    a, b = TokenStore.open(tmp_path / "small"), TokenStore.open(tmp_path / "grown")
    want_small = small.expected(0.5)
    for name in ("train", "val"):
        old = read_all_docs(a.split(name))
        assert_docs_equal(old, want_small[name])
        new = read_all_docs(b.split(name))
        assert_docs_equal(new[: len(old)], old)  # old files sort first: a prefix
        assert len(new) > len(old)
    assert a.fingerprint != b.fingerprint
    assert all(
        is_val(i, 0.5) == (i in {d for d, _ in small.docs if is_val(d, 0.5)}) for i, _ in small.docs
    )


def test_zstd_codec_store_reads_the_same_tokens(corpus, built_store, tmp_path):
    layout = Layout(**{**TINY.__dict__, "codec": "zstd"})
    build_store(
        [str(corpus.root)],
        tmp_path / "z",
        opts(val_fraction=VAL_FRACTION, text_mode="paragraph", layout=layout),
    )
    plain, z = TokenStore.open(built_store), TokenStore.open(tmp_path / "z")
    for name in ("train", "val"):
        p, q = plain.split(name), z.split(name)
        assert np.array_equal(p.tokens(0, p.n_tokens), q.tokens(0, q.n_tokens))
        assert np.array_equal(p.doc_offsets, q.doc_offsets)
    # Same content, different layout: different prep configuration, so a different fingerprint.
    assert plain.attrs["checksums"] == z.attrs["checksums"]
    assert plain.fingerprint != z.fingerprint


def test_invalid_options_are_collected_into_one_error(corpus, tmp_path):
    bad = opts(
        val_fraction=1.5,
        workers=0,
        text_mode="sentence",
        layout=Layout(shard_tokens=1000, chunk_tokens=512),
    )
    with pytest.raises(PrepError) as err:
        build_store([str(corpus.root)], tmp_path / "s", bad)
    msg = str(err.value)
    for key in ("--val-fraction", "--workers", "--text-mode", "--shard-tokens"):
        assert key in msg
    assert not (tmp_path / "s").exists()


def test_real_corpora_from_shared_data(shared_data, tmp_path):
    """wikitext-2 articles (JSONL with a title field) + tinyshakespeare (paragraph mode): every
    document equals tiktoken's encoding + EOT, and the whole store verifies."""
    from zeroforge.data_prep.verify import verify_store

    articles = shared_data / "wikitext-2" / "articles.jsonl"
    shakespeare = shared_data / "tinyshakespeare.txt"
    layout = Layout(shard_tokens=65536, chunk_tokens=4096)
    build_store(
        [str(articles), str(shakespeare)],
        tmp_path / "s",
        opts(text_mode="paragraph", layout=layout, workers=2),
    )
    texts = [json.loads(line)["text"] for line in articles.read_text().splitlines() if line.strip()]
    block: list[str] = []
    for line in shakespeare.read_text().split("\n") + [""]:
        if line.strip():
            block.append(line.rstrip("\r"))
        elif block:
            texts.append("\n".join(block))
            block = []
    enc = get_encoding("gpt2")
    split = TokenStore.open(tmp_path / "s").split("train")
    assert split.n_docs == len(texts) > 7000
    ids = enc.encode_ordinary_batch(texts, num_threads=1)
    want = np.concatenate([np.append(np.asarray(x, dtype=np.uint16), EOT) for x in ids])
    assert np.array_equal(split.tokens(0, split.n_tokens), want)
    assert np.array_equal(np.diff(split.doc_offsets), [len(x) + 1 for x in ids])
    assert verify_store(str(tmp_path / "s")) == []


def _jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_default_val_share_never_leaves_val_empty(tmp_path):
    """By default 1% of the documents go to val by id hash; a corpus where none hashes there
    (any small one) still gets one val document, its last, so that the recipes can evaluate."""
    texts = [f"document number {i} " + "word " * (i % 7 + 3) for i in range(20)]
    corpus = _jsonl(tmp_path / "c" / "corpus.jsonl", texts)
    ids = [f"corpus.jsonl:{i + 1}" for i in range(len(texts))]
    assert not any(is_val(i, 0.01) for i in ids), "the test needs a corpus with no val by hash"
    build_store([str(corpus)], tmp_path / "s", opts(val_fraction=0.01))
    store, enc = TokenStore.open(tmp_path / "s"), get_encoding("gpt2")
    want = [np.array(enc.encode_ordinary(t) + [EOT]) for t in texts]
    assert_docs_equal(read_all_docs(store.split("val")), want[-1:])
    assert_docs_equal(read_all_docs(store.split("train")), want[:-1])
    # One document stays in train (training needs it); --val-fraction 0 means no val at all.
    build_store([str(_jsonl(tmp_path / "one" / "a.jsonl", texts[:1]))], tmp_path / "s1",
                opts(val_fraction=0.01))
    assert TokenStore.open(tmp_path / "s1").attrs["counts"]["val"]["docs"] == 0
    build_store([str(corpus)], tmp_path / "s0", opts(val_fraction=0.0))
    assert TokenStore.open(tmp_path / "s0").attrs["counts"]["val"]["docs"] == 0


def test_held_back_document_survives_an_interrupted_build(tmp_path):
    """The document held back while val is empty is part of every commit: a build stopped
    midway (here by --strict) resumes to the store an uninterrupted build makes."""
    texts = [f"row {i} " + "word " * (i % 5 + 20) for i in range(60)]
    rows = [json.dumps({"text": t}) for t in texts]
    rows.insert(50, '{"text": broken json')
    corpus = tmp_path / "c" / "corpus.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("\n".join(rows) + "\n")
    common = {"val_fraction": 1e-9, "batch_chars": 400, "commit_seconds": 0}
    build_store([str(corpus)], tmp_path / "clean", opts(**common))
    out = tmp_path / "s"
    with pytest.raises(PrepError, match="malformed JSON"):
        build_store([str(corpus)], out, opts(strict=True, **common))
    with np.load(max((out / "_build").glob("tails-*.npz"))) as tails:
        assert "held/tokens" in tails.files
    build_store([str(corpus)], out, opts(**common))
    assert store_digest(out) == store_digest(tmp_path / "clean")
    assert TokenStore.open(out).attrs["counts"]["val"]["docs"] == 1
