"""data_prep/store.py reader: random access equals a full read; damaged stores are refused with
an error naming the array and shard/chunk; reads after fork and from threads are correct."""

from __future__ import annotations

import os
import random
import shutil
import threading

import numpy as np
import pytest
from zeroforge.data_prep.store import Layout, StoreError, TokenStore

from .conftest import (
    MISSING,
    TINY,
    VAL_FRACTION,
    flip_byte,
    root_attrs,
    set_root_attrs,
    shard_index,
    write_shard_index,
)

N_CHUNKS = TINY.shard_tokens // TINY.chunk_tokens


@pytest.fixture(scope="module")
def full(built_store, corpus):
    """The expected token stream of every split, from tiktoken, independent of the reader."""
    want = corpus.expected(VAL_FRACTION)
    return {name: np.concatenate(docs) for name, docs in want.items()}


def _boundary_ranges(n: int, rng: random.Random) -> list[tuple[int, int]]:
    """Ranges that start/end exactly on, just before and just after chunk and shard edges."""
    out = [(0, n), (0, 0), (n, n), (0, 1), (n - 1, n)]
    for edge in range(TINY.chunk_tokens, n, TINY.chunk_tokens):
        for lo, hi in (
            (edge - 1, edge + 1),
            (edge, edge + 1),
            (edge - 3, edge),
            (edge - 600, edge + 5000),
        ):
            out.append((max(lo, 0), min(hi, n)))
    for _ in range(300):
        lo = rng.randrange(n)
        out.append(
            (
                lo,
                min(
                    n,
                    lo
                    + rng.choice(
                        [1, 2, 511, 512, 513, 1025, 4095, 4096, 4097, rng.randrange(1, 20000)]
                    ),
                ),
            )
        )
    return out


def test_random_ranges_equal_the_full_stream(built_store, full):
    store = TokenStore.open(built_store)
    rng = random.Random(0)
    for name in ("train", "val"):
        split = store.split(name)
        want = full[name]
        assert split.n_tokens == len(want) == len(split)
        assert split.n_tokens > 2 * TINY.shard_tokens, "corpus too small to cross shards"
        for lo, hi in _boundary_ranges(split.n_tokens, rng):
            got = split.tokens(lo, hi)
            assert got.dtype == np.uint16 and np.array_equal(got, want[lo:hi]), (name, lo, hi)
        got = split.tokens(10, 20)
        got[0] = 1  # callers get their own writable array, never a view of the reader's cache
        assert np.array_equal(split.tokens(10, 20), want[10:20])


def test_doc_and_bounds(built_store, corpus):
    store = TokenStore.open(built_store)
    want = corpus.expected(VAL_FRACTION)
    split = store.split("val")
    for i in (0, 1, split.n_docs // 2, split.n_docs - 1):
        assert np.array_equal(split.doc(i), want["val"][i])
    with pytest.raises(IndexError):
        split.doc(split.n_docs)
    with pytest.raises(IndexError):
        split.doc(-1)
    with pytest.raises(IndexError):
        split.tokens(0, split.n_tokens + 1)
    with pytest.raises(IndexError):
        split.tokens(5, 4)
    with pytest.raises(KeyError, match="no split 'test'"):
        store.split("test")


def test_reads_from_threads(built_store, full):
    store = TokenStore.open(built_store)
    split = store.split("train")
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(300):
            lo = rng.randrange(split.n_tokens - 2000)
            if not np.array_equal(split.tokens(lo, lo + 1500), full["train"][lo : lo + 1500]):
                errors.append((seed, lo))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_reads_after_fork(built_store, full):
    """A forked child (e.g. a DataLoader worker) reads correctly with the parent's reader object,
    and the parent still reads correctly afterwards."""
    store = TokenStore.open(built_store)
    split = store.split("train")
    want = full["train"]
    assert np.array_equal(split.tokens(0, split.n_tokens), want)  # parent has every shard open
    rng = random.Random(1)
    windows = [(lo, lo + 1000) for lo in (rng.randrange(split.n_tokens - 1000) for _ in range(200))]
    pid = os.fork()
    if pid == 0:  # child: exit code says whether every window was right
        ok = all(np.array_equal(split.tokens(a, b), want[a:b]) for a, b in windows)
        ok = ok and np.array_equal(store.split("val").doc(3), store.split("val").doc(3))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert all(np.array_equal(split.tokens(a, b), want[a:b]) for a, b in windows)


# --- refusals -------------------------------------------------------------------------------------
def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a token store"):
        TokenStore.open(tmp_path)
    import zarr

    zarr.open_group(str(tmp_path / "g"), mode="w").attrs["format"] = "something-else"
    with pytest.raises(StoreError, match="not a zeroforge-token-store"):
        TokenStore.open(tmp_path / "g")


def test_incomplete_store_is_refused(store_copy):
    set_root_attrs(store_copy, complete=False)
    with pytest.raises(StoreError, match="did not complete.*rerun"):
        TokenStore.open(store_copy)


def test_unsupported_format_version_is_refused(store_copy):
    set_root_attrs(store_copy, format_version=99)
    with pytest.raises(StoreError, match="version 99"):
        TokenStore.open(store_copy)


def test_deleted_shard_file_is_refused(store_copy):
    (store_copy / "train" / "tokens" / "c" / "2").unlink()
    with pytest.raises(StoreError, match=r"train/tokens shard c/2: shard file is missing"):
        TokenStore.open(store_copy)


def test_truncated_shard_file_is_refused(store_copy):
    shard = store_copy / "val" / "tokens" / "c" / "1"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(StoreError, match=r"val/tokens shard c/1"):
        TokenStore.open(store_copy)


def test_shard_whose_index_marks_a_chunk_missing_is_refused(store_copy):
    shard = store_copy / "train" / "tokens" / "c" / "1"
    index = shard_index(shard, N_CHUNKS)
    index[5] = MISSING  # what zarr writes for a chunk that was never stored
    write_shard_index(shard, index)
    with pytest.raises(StoreError, match=r"train/tokens shard c/1: chunk 5 is missing"):
        TokenStore.open(store_copy)


def test_corrupt_shard_index_is_refused(store_copy):
    shard = store_copy / "train" / "tokens" / "c" / "0"
    size = shard.stat().st_size
    flip_byte(shard, size - 20)  # inside the index, before its CRC
    with pytest.raises(StoreError, match=r"train/tokens shard c/0: shard index: checksum mismatch"):
        TokenStore.open(store_copy)


def test_flipped_byte_in_a_chunk_names_array_shard_and_chunk(store_copy, full):
    shard = store_copy / "train" / "tokens" / "c" / "3"
    offset, nbytes = (int(x) for x in shard_index(shard, N_CHUNKS)[6])
    flip_byte(shard, offset + 100)
    store = TokenStore.open(store_copy)  # opening reads only the indexes
    split = store.split("train")
    first = 3 * TINY.shard_tokens + 6 * TINY.chunk_tokens
    assert np.array_equal(split.tokens(0, first), full["train"][:first])  # other chunks still read
    with pytest.raises(StoreError, match=r"train/tokens shard c/3 chunk 6: checksum mismatch"):
        split.tokens(
            first + 400, first + 401
        )  # the chunk is checked whole, wherever the read falls


def test_flipped_byte_in_doc_offsets_raises_store_error(store_copy):
    """doc_offsets are read through zarr: a corrupt chunk must still surface as a StoreError
    naming the array, not as zarr's bare ValueError."""
    shard = store_copy / "train" / "doc_offsets" / "c" / "0"
    flip_byte(shard, 40)  # inside inner chunk 0's data
    store = TokenStore.open(store_copy)
    with pytest.raises(StoreError, match="train/doc_offsets"):
        store.split("train").doc(0)


def test_doc_offsets_not_matching_the_recorded_checksum(store_copy):
    attrs = root_attrs(store_copy)
    checksums = attrs["checksums"]
    checksums["val"]["doc_offsets"] = "00000000"
    set_root_attrs(store_copy, checksums=checksums)
    with pytest.raises(StoreError, match="val/doc_offsets: checksum mismatch"):
        _ = TokenStore.open(store_copy).split("val").doc_offsets


def test_fingerprint_is_stable_and_content_bound(built_store, tmp_path):
    a = TokenStore.open(built_store)
    shutil.copytree(built_store, tmp_path / "copy")
    b = TokenStore.open(tmp_path / "copy")
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint.startswith(root_attrs(built_store)["prep_config_hash"][:16])


def test_zstd_store_reads_equal_and_names_a_corrupt_chunk(corpus, built_store, full, tmp_path):
    from zeroforge.data_prep.build import build_store

    from .conftest import opts

    layout = Layout(**{**TINY.__dict__, "codec": "zstd"})
    build_store(
        [str(corpus.root)],
        tmp_path / "z",
        opts(val_fraction=VAL_FRACTION, text_mode="paragraph", layout=layout),
    )
    split = TokenStore.open(tmp_path / "z").split("train")
    rng = random.Random(3)
    for lo, hi in _boundary_ranges(split.n_tokens, rng)[:400]:
        assert np.array_equal(split.tokens(lo, hi), full["train"][lo:hi]), (lo, hi)
    shard = tmp_path / "z" / "train" / "tokens" / "c" / "1"
    offset, nbytes = (int(x) for x in shard_index(shard, N_CHUNKS)[4])
    flip_byte(shard, offset + nbytes // 2)
    split = TokenStore.open(tmp_path / "z").split("train")
    with pytest.raises(StoreError, match=r"train/tokens shard c/1 chunk 4: checksum mismatch"):
        split.tokens(
            TINY.shard_tokens + 4 * TINY.chunk_tokens,
            TINY.shard_tokens + 4 * TINY.chunk_tokens + 10,
        )
