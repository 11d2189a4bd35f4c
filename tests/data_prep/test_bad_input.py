"""Bad input: skipped and counted by default (logged with file:line), fatal under --strict with a
one-line error naming file:line; bad paths, bad settings and bad outputs are refused cleanly."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from zeroforge.data_prep.build import PrepError, build_store
from zeroforge.data_prep.store import Layout, StoreError, TokenStore
from zeroforge.data_prep.tokenize import TokenizerError, get_encoding

from .conftest import EOT, TINY_CLI, opts, root_attrs, store_digest

BOM = b"\xef\xbb\xbf"

# (line bytes, reason key it is counted under) -- line numbers are 1-based below.
BAD_LINES = {
    "malformed JSON": b'{"text": "unterminated\n',
    "invalid UTF-8": b'{"text": "caf\xe9 au lait"}\n',
    "not a JSON object": b'["a", "list"]\n',
    "missing field 'text'": b'{"id": "no-text", "body": "x"}\n',
    "field 'text' is null": b'{"text": null}\n',
    "empty text": b'{"text": ""}\n',
    "whitespace-only text": b'{"text": "  \\n\\t  "}\n',
    "text is not a string": b'{"text": 42}\n',
}


def _mixed_jsonl(path):
    """BOM + good first record, then every kind of bad line, each followed by a good one."""
    lines = [BOM + b'{"id": "first", "text": "The first record parses despite the BOM."}\n']
    for i, bad in enumerate(BAD_LINES.values()):
        lines.append(bad)
        lines.append(json.dumps({"text": f"good record {i}"}).encode() + b"\n")
    lines.append(b'{"text": "second bad encoding here: \xc3\x28"}\n')
    lines.append(b'"a bare string"\n')
    path.write_bytes(b"".join(lines))
    return path


def test_bad_records_are_skipped_counted_and_logged_with_file_and_line(tmp_path, caplog):
    src = _mixed_jsonl(tmp_path / "mixed.jsonl")
    with caplog.at_level(logging.WARNING, logger="zeroforge.data_prep"):
        attrs = build_store([str(src)], tmp_path / "s", opts())
    skipped = attrs["skipped"]
    assert skipped["total"] == len(BAD_LINES) + 2
    assert sum(skipped["by_reason"].values()) == skipped["total"]
    by_reason = skipped["by_reason"]
    assert by_reason["malformed JSON"] == 1
    assert by_reason["not a JSON object"] == 2
    assert by_reason["missing field 'text'"] == 1
    assert by_reason["field 'text' is null"] == 1
    assert by_reason["empty text"] == 2
    assert root_attrs(tmp_path / "s")["skipped"] == skipped
    # Every bad line is logged with its file:line (bad lines are the even lines 2..16, then 18, 19).
    for line in [*range(2, 2 + 2 * len(BAD_LINES), 2), 18, 19]:
        assert f"skipped {src}:{line}:" in caplog.text, line
    # The good records, the BOM one first, all made it.
    enc = get_encoding("gpt2")
    split = TokenStore.open(tmp_path / "s").split("train")
    texts = ["The first record parses despite the BOM."] + [
        f"good record {i}" for i in range(len(BAD_LINES))
    ]
    assert split.n_docs == len(texts)
    for i, text in enumerate(texts):
        assert split.doc(i).tolist() == enc.encode_ordinary(text) + [EOT]


def test_skip_reasons_group_records_of_the_same_kind(tmp_path):
    """by_reason counts kinds of problems: two invalid-UTF-8 lines (at different byte offsets)
    are one reason with count 2, not two reasons that embed the offset."""
    src = _mixed_jsonl(tmp_path / "mixed.jsonl")
    by_reason = build_store([str(src)], tmp_path / "s", opts())["skipped"]["by_reason"]
    utf8 = {k: v for k, v in by_reason.items() if "UTF-8" in k}
    assert list(utf8.values()) == [2], by_reason


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_strict_stops_on_the_first_bad_record(zf, tmp_path, kind):
    src = tmp_path / "one-bad.jsonl"
    src.write_bytes(b'{"text": "fine"}\n' + BAD_LINES[kind] + b'{"text": "never read"}\n')
    out = tmp_path / "s"
    r = zf("prep", src, "--out", out, "--strict", *TINY_CLI)
    assert r.rc == 2, r.text
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zeroforge prep: error: ")
    assert f"{src}:2:" in lines[0]
    assert "Traceback" not in r.text
    with pytest.raises(StoreError):
        TokenStore.open(out)


def test_bom_at_the_start_of_text_and_gz_files(tmp_path):
    import gzip

    (tmp_path / "a.txt").write_bytes(BOM + "héllo".encode())
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(BOM + b'{"text": "zipped"}\n'))
    build_store(
        [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl.gz")], tmp_path / "s", opts(strict=True)
    )
    enc = get_encoding("gpt2")
    split = TokenStore.open(tmp_path / "s").split("train")
    assert split.doc(0).tolist() == enc.encode_ordinary("héllo") + [EOT]
    assert split.doc(1).tolist() == enc.encode_ordinary("zipped") + [EOT]


def test_a_50mb_single_document(tmp_path):
    """One 50 MB document of ordinary words. Every word is one GPT-2 token with its leading
    space, so the expected ids come from a table instead of a second 50 MB encode."""
    enc = get_encoding("gpt2")
    words = [
        " the",
        " quick",
        " brown",
        " fox",
        " jumps",
        " over",
        " a",
        " lazy",
        " dog",
        " and",
        " river",
        " stone",
    ]
    table = np.array([enc.encode_ordinary(w) for w in words]).reshape(-1)
    assert len(table) == len(words)
    idx = np.random.default_rng(0).integers(0, len(words), size=10_500_000)
    text = "".join([words[i] for i in idx.tolist()])
    assert len(text) > 50_000_000
    (tmp_path / "big.txt").write_text(text)
    del text
    layout = Layout(shard_tokens=2**22, chunk_tokens=2**16)
    attrs = build_store([str(tmp_path / "big.txt")], tmp_path / "s", opts(layout=layout))
    assert attrs["counts"]["train"] == {"docs": 1, "tokens": len(idx) + 1}
    doc = TokenStore.open(tmp_path / "s").split("train").doc(0)
    assert doc[-1] == EOT
    assert np.array_equal(doc[:-1], table[idx])


# --- inputs, settings, outputs --------------------------------------------------------------------
def test_missing_input_file(zf, tmp_path):
    r = zf("prep", tmp_path / "absent.jsonl", "--out", tmp_path / "s", *TINY_CLI)
    assert r.rc == 2 and "absent.jsonl: no such file or directory" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("content", [b"", b"   \n\n", b'{"text": ""}\n{"text": null}\nnot json\n'])
def test_input_without_documents_leaves_no_store(zf, tmp_path, content):
    name = "empty.jsonl" if content.startswith(b"{") else "empty.txt"
    (tmp_path / name).write_bytes(content)
    r = zf("prep", tmp_path / name, "--out", tmp_path / "s", *TINY_CLI)
    assert r.rc == 2 and "no documents" in r.err, r.text
    assert not (tmp_path / "s").exists()


def test_unknown_tokenizer(zf, corpus, tmp_path):
    r = zf("prep", corpus.root, "--out", tmp_path / "s", "--tokenizer", "gpt5")
    assert r.rc == 2 and "gpt5" in r.err and "gpt2" in r.err
    assert not (tmp_path / "s").exists()
    with pytest.raises(TokenizerError, match="unknown tokenizer 'gpt5'"):
        build_store([str(corpus.root)], tmp_path / "s", opts(tokenizer="gpt5"))
    assert not (tmp_path / "s").exists()


def test_output_built_with_other_settings_needs_overwrite(zf, corpus, tmp_path):
    out = tmp_path / "s"
    assert zf("prep", corpus.root, "--out", out, "--text-mode", "paragraph", *TINY_CLI).rc == 0
    digest = store_digest(out)
    r = zf("prep", corpus.root, "--out", out, "--text-mode", "line", *TINY_CLI)
    assert r.rc == 2 and "other settings" in r.err and "--overwrite" in r.err
    assert store_digest(out) == digest
    r = zf("prep", corpus.root, "--out", out, "--text-mode", "line", "--overwrite", *TINY_CLI)
    assert r.rc == 0, r.text
    assert root_attrs(out)["prep_config"]["source"]["text_mode"] == "line"
    assert TokenStore.open(out).split("train").n_docs > 0


def test_output_that_is_not_a_store_is_refused(zf, corpus, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        r = zf("prep", corpus.root, "--out", out, *TINY_CLI, *extra)
        assert r.rc == 2 and "not a token store" in r.err, r.text
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_output_that_is_a_file_is_refused(zf, corpus, tmp_path):
    out = tmp_path / "a-file"
    out.write_text("keep me")
    r = zf("prep", corpus.root, "--out", out, *TINY_CLI)
    assert r.rc == 2 and str(out) in r.err, r.text
    assert out.read_text() == "keep me"


def test_an_empty_existing_directory_is_a_fine_output(corpus, tmp_path):
    (tmp_path / "s").mkdir()
    build_store([str(corpus.root)], tmp_path / "s", opts())
    assert TokenStore.open(tmp_path / "s").split("train").n_docs == 6


def test_no_inputs(zf, tmp_path):
    r = zf("prep", "--out", tmp_path / "s")
    assert r.rc == 2 and "no INPUT" in r.err
    r = zf("prep", "x.txt")
    assert r.rc == 2 and "--out is required" in r.err
    with pytest.raises(PrepError, match="no inputs"):
        build_store([], tmp_path / "s", opts())
