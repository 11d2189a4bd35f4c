"""`zeroforge verify` and `zeroforge inspect` on good and damaged stores."""

from __future__ import annotations

import json
import zlib

import numpy as np
from zeroforge.data_prep.store import TokenStore

from .conftest import (
    MISSING,
    TINY,
    fix_chunk_crc,
    flip_byte,
    root_attrs,
    set_root_attrs,
    shard_index,
    write_shard_index,
)

N_CHUNKS = TINY.shard_tokens // TINY.chunk_tokens


def _fails(result, *needles):
    assert result.rc == 1, result.text
    assert "Traceback" not in result.text
    fails = [line for line in result.err.splitlines() if line.startswith("FAIL ")]
    assert fails, result.err
    for needle in needles:
        assert any(needle in line for line in fails), (needle, fails)


def _set_token(store, split: str, pos: int, value: int) -> None:
    """Overwrite one token on disk and repair every checksum that covers it (chunk CRC-32C and
    the split's recorded CRC-32), so only the semantic checks can notice."""
    reader = TokenStore.open(store).split(split)
    tokens = reader.tokens(0, reader.n_tokens)
    shard_no, within = divmod(pos, TINY.shard_tokens)
    chunk, elem = divmod(within, TINY.chunk_tokens)
    shard = store / split / "tokens" / "c" / str(shard_no)
    offset = int(shard_index(shard, N_CHUNKS)[chunk, 0])
    data = bytearray(shard.read_bytes())
    data[offset + 2 * elem : offset + 2 * elem + 2] = int(value).to_bytes(2, "little")
    shard.write_bytes(bytes(data))
    fix_chunk_crc(shard, N_CHUNKS, chunk)
    tokens[pos] = value
    checksums = root_attrs(store)["checksums"]
    checksums[split]["tokens"] = f"{zlib.crc32(tokens.astype('<u2').tobytes()):08x}"
    set_root_attrs(store, checksums=checksums)


def test_verify_passes_a_good_store(zf, built_store):
    r = zf("verify", built_store)
    assert r.rc == 0 and f"OK {built_store}" in r.out, r.text


def test_verify_names_a_flipped_byte_in_a_token_chunk(zf, store_copy):
    shard = store_copy / "val" / "tokens" / "c" / "1"
    offset, _ = (int(x) for x in shard_index(shard, N_CHUNKS)[2])
    flip_byte(shard, offset + 7)
    _fails(zf("verify", store_copy), "val/tokens shard c/1 chunk 2: checksum mismatch")


def test_verify_names_a_flipped_byte_in_doc_offsets(zf, store_copy):
    flip_byte(store_copy / "train" / "doc_offsets" / "c" / "0", 16)
    _fails(zf("verify", store_copy), "train/doc_offsets")


def test_verify_catches_doc_offsets_that_pass_their_chunk_crc(zf, store_copy):
    shard = store_copy / "train" / "doc_offsets" / "c" / "0"
    flip_byte(shard, 16)
    fix_chunk_crc(shard, 4, 0)  # offsets shard of 1024 entries, chunks of 256
    _fails(zf("verify", store_copy), "train/doc_offsets: checksum mismatch")


def test_verify_catches_token_bytes_that_pass_their_chunk_crc(zf, store_copy):
    shard = store_copy / "train" / "tokens" / "c" / "0"
    offset, _ = (int(x) for x in shard_index(shard, N_CHUNKS)[1])
    flip_byte(shard, offset + 10)
    fix_chunk_crc(shard, N_CHUNKS, 1)
    _fails(zf("verify", store_copy), "train/tokens: checksum mismatch")


def test_verify_names_a_deleted_chunk(zf, store_copy):
    shard = store_copy / "train" / "tokens" / "c" / "2"
    index = shard_index(shard, N_CHUNKS)
    index[3] = MISSING
    write_shard_index(shard, index)
    _fails(zf("verify", store_copy), "train/tokens shard c/2: chunk 3 is missing")


def test_verify_names_a_deleted_shard_file(zf, store_copy):
    (store_copy / "val" / "tokens" / "c" / "0").unlink()
    _fails(zf("verify", store_copy), "val/tokens shard c/0: shard file is missing")


def test_verify_refuses_an_incomplete_store(zf, store_copy):
    set_root_attrs(store_copy, complete=False)
    _fails(zf("verify", store_copy), "did not complete")


def test_verify_checks_token_ids_and_document_ends(zf, store_copy):
    reader = TokenStore.open(store_copy).split("train")
    end_of_doc4 = int(reader.doc_offsets[5]) - 1
    _set_token(store_copy, "train", 100, 60000)  # beyond GPT-2's 50257
    _set_token(store_copy, "train", end_of_doc4, 13)  # document 4 loses its EOT
    _fails(
        zf("verify", store_copy),
        "train/tokens: id 60000 at 100 >= vocab size 50257",
        "train: document 4 does not end with EOT",
    )


def test_inspect_json_fields(zf, built_store, corpus):
    r = zf("inspect", built_store, "--json")
    assert r.rc == 0, r.text
    info = json.loads(r.out)
    store = TokenStore.open(built_store)
    assert info["path"] == str(built_store)
    assert info["format"] == "zeroforge-token-store v1"
    assert info["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256}
    assert info["dtype"] == "uint16"
    assert info["splits"] == {
        s: {"docs": store.split(s).n_docs, "tokens": store.split(s).n_tokens}
        for s in ("train", "val")
    }
    assert info["skipped"] == {"total": 0, "by_reason": {}}
    assert info["sources"] == [str(corpus.root)]
    assert info["layout"]["shard_tokens"] == TINY.shard_tokens and info["layout"]["codec"] == "none"
    assert info["size_bytes"] == sum(
        f.stat().st_size for f in built_store.rglob("*") if f.is_file()
    )
    assert info["fingerprint"] == store.fingerprint
    assert np.sum([c["tokens"] for c in info["splits"].values()]) > 0


def test_inspect_text_output(zf, built_store):
    r = zf("inspect", built_store)
    assert r.rc == 0, r.text
    store = TokenStore.open(built_store)
    assert "gpt2" in r.out and "uint16" in r.out and store.fingerprint in r.out
    assert f"{store.split('train').n_tokens:,} tokens" in r.out


def test_inspect_refuses_what_is_not_a_complete_store(zf, store_copy, tmp_path):
    set_root_attrs(store_copy, complete=False)
    r = zf("inspect", store_copy)
    assert r.rc == 1 and "did not complete" in r.err
    r = zf("inspect", tmp_path / "nothing")
    assert r.rc == 1 and "not a token store" in r.err
