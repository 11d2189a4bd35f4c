"""data_prep/sources.py: every input format as an ordered stream of documents with stable ids."""

from __future__ import annotations

import gzip
import json
import os
import sysconfig
from pathlib import Path

import pytest
from zeroforge.data_prep.sources import (
    SourceError,
    SourceOptions,
    Unit,
    expand_inputs,
    partition,
    read_records,
)


def records(inputs, **kw):
    return list(read_records(expand_inputs([str(i) for i in inputs]), SourceOptions(**kw)))


def docs(inputs, **kw):
    """(id, text) of the records that became documents."""
    return [(r.id, r.text) for r in records(inputs, **kw) if r.skip is None]


ROWS = [
    {"id": "a-1", "text": "First document.\nWith two lines."},
    {"text": "No id here, so the position names it."},
    {"id": 7, "text": "Integer id 東京 🙂"},
    {"id": None, "text": "A null id falls back to the position."},
    {"id": "a-5", "text": "Literal <|endoftext|> stays text."},
]


def _jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _expected_rows(name: str) -> list[tuple[str, str]]:
    """Ids: the record's own id when present, else NAME:LINE (1-based)."""
    out = []
    for line, row in enumerate(ROWS, 1):
        doc_id = f"id:{row['id']}" if row.get("id") is not None else f"{name}:{line}"
        out.append((doc_id, row["text"]))
    return out


# --- plain text ------------------------------------------------------------------------------------
def test_text_file_mode_one_document_per_file(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfHello\n\nworld\r\n")
    (tmp_path / "b.txt").write_text("second file")
    got = docs([tmp_path / "a.txt", tmp_path / "b.txt"])
    # The BOM is not part of the text; the file's text is otherwise kept byte for byte.
    assert got == [("a.txt", "Hello\n\nworld\r\n"), ("b.txt", "second file")]


def test_text_paragraph_mode(tmp_path):
    text = "\n\n  \nfirst para\nline two\r\n\nsecond para\n\n\n\nthird\nend"
    (tmp_path / "p.txt").write_text(text)
    got = docs([tmp_path / "p.txt"], text_mode="paragraph")
    assert got == [
        ("p.txt:4", "first para\nline two"),
        ("p.txt:7", "second para"),
        ("p.txt:11", "third\nend"),
    ]
    assert [r.where for r in records([tmp_path / "p.txt"], text_mode="paragraph")] == [
        f"{tmp_path / 'p.txt'}:{n}" for n in (4, 7, 11)
    ]


def test_text_line_mode(tmp_path):
    (tmp_path / "l.txt").write_text("one\n\ntwo\r\n   \nthree")
    assert docs([tmp_path / "l.txt"], text_mode="line") == [
        ("l.txt:1", "one"),
        ("l.txt:3", "two"),
        ("l.txt:5", "three"),
    ]


def test_bad_text_mode_is_reported():
    problems = SourceOptions(text_mode="sentence").validate()
    assert problems and "--text-mode" in problems[0]


# --- JSONL, compressed JSONL --------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_formats(tmp_path, suffix):
    import zstandard

    raw = _jsonl_bytes(ROWS)
    path = tmp_path / f"rows{suffix}"
    if suffix.endswith(".gz"):
        path.write_bytes(gzip.compress(raw))
    elif suffix.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    else:
        path.write_bytes(raw)
    assert docs([path]) == _expected_rows(path.name)
    assert [r.where for r in records([path])] == [f"{path}:{n}" for n in range(1, 6)]


def test_jsonl_custom_text_and_id_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "x y", "key": "k1", "text": "ignored"}\n{"body": "z"}\n')
    assert docs([path], text_field="body", id_field="key") == [("id:k1", "x y"), ("c.jsonl:2", "z")]


# --- Parquet ----------------------------------------------------------------------------------------
def test_parquet_with_and_without_id_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [r["text"] for r in ROWS]
    pq.write_table(
        pa.table({"text": texts, "id": [f"p{i}" for i in range(5)]}), tmp_path / "a.parquet"
    )
    # Small row groups: rows must still come back in file order across groups.
    pq.write_table(
        pa.table({"text": texts, "n": list(range(5))}), tmp_path / "b.parquet", row_group_size=2
    )
    assert docs([tmp_path / "a.parquet"]) == [(f"id:p{i}", t) for i, t in enumerate(texts)]
    assert docs([tmp_path / "b.parquet"]) == [(f"b.parquet:{i}", t) for i, t in enumerate(texts)]


def test_parquet_without_text_column_is_a_source_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(SourceError, match="a.parquet.*no column 'text'"):
        records([tmp_path / "a.parquet"])


# --- Hugging Face datasets --------------------------------------------------------------------------
def test_hf_saved_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"text": [r["text"] for r in ROWS], "id": ["h0", None, "h2", None, "h4"]}
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    got = docs([tmp_path / "saved"])
    label = "hf:saved[train]"
    assert got == [
        ("id:h0", ROWS[0]["text"]),
        (f"{label}:1", ROWS[1]["text"]),
        ("id:h2", ROWS[2]["text"]),
        (f"{label}:3", ROWS[3]["text"]),
        ("id:h4", ROWS[4]["text"]),
    ]


def test_hf_saved_dataset_dict_reads_the_chosen_split(tmp_path):
    """A DatasetDict saved with save_to_disk has dataset_dict.json at the top and one saved
    Dataset per split below: it is one HF input, not a directory of text files."""
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["train one", "train two"]}),
            "validation": datasets.Dataset.from_dict({"text": ["valid one"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    units = expand_inputs([str(tmp_path / "dd")])
    assert [u.kind for u in units] == ["hf-disk"], f"saved DatasetDict expanded as {units}"
    assert [t for _, t in docs([tmp_path / "dd"])] == ["train one", "train two"]
    assert [t for _, t in docs([tmp_path / "dd"], hf_split="validation")] == ["valid one"]
    with pytest.raises(SourceError, match="no split 'test'"):
        docs([tmp_path / "dd"], hf_split="test")


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_load_dataset_on_a_local_directory(tmp_path, streaming):
    """`hf:NAME` goes through datasets.load_dataset; a local directory of JSON files takes the
    same code path as a hub name and needs no network."""
    data = tmp_path / "jsondir"
    data.mkdir()
    (data / "part-0.jsonl").write_bytes(_jsonl_bytes(ROWS[:3]))
    (data / "part-1.jsonl").write_bytes(_jsonl_bytes(ROWS[3:]))
    [unit] = expand_inputs([f"hf:{data}"])
    assert unit.kind == "hf-hub" and unit.location == str(data)
    got = docs([f"hf:{data}"], hf_streaming=streaming)
    label = f"hf:{data}[train]"
    # Rows in file order; the id column is used where it is set.
    assert [t for _, t in got] == [r["text"] for r in ROWS]
    assert [i for i, _ in got] == ["id:a-1", f"{label}:1", "id:7", f"{label}:3", "id:a-5"]


def test_hf_unloadable_dataset_is_a_source_error(tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    with pytest.raises(SourceError, match="cannot load dataset"):
        records([f"hf:{empty}"])


# --- directories, globs, builtins --------------------------------------------------------------------
def _tree(root: Path) -> None:
    for rel in [
        "b/z.txt",
        "a/y.txt",
        "a/x.txt",
        "c.txt",
        "a/sub/w.txt",
        ".hidden.txt",
        "a/.skip/v.txt",
    ]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"content of {rel}")


def test_directory_expands_recursively_in_sorted_order(tmp_path):
    _tree(tmp_path / "tree")
    units = expand_inputs([str(tmp_path / "tree")])
    assert [u.name for u in units] == [
        "tree/a/sub/w.txt",
        "tree/a/x.txt",
        "tree/a/y.txt",
        "tree/b/z.txt",
        "tree/c.txt",
    ]
    assert all(u.kind == "text" and u.size == os.path.getsize(u.location) for u in units)


def test_glob_expands_in_sorted_order_and_inputs_keep_their_order(tmp_path):
    _tree(tmp_path / "tree")
    root = tmp_path / "tree"
    units = expand_inputs([str(root / "c.txt"), str(root / "**" / "*.txt")])
    assert [Path(u.location).relative_to(root).as_posix() for u in units] == [
        "c.txt",  # the first input comes first, even though the glob also sorts it last
        "a/sub/w.txt",
        "a/x.txt",
        "a/y.txt",
        "b/z.txt",
        "c.txt",
    ]
    assert [u.name for u in expand_inputs([str(root / "a" / "*.txt")])] == ["x.txt", "y.txt"]


def test_missing_inputs_are_source_errors(tmp_path):
    with pytest.raises(SourceError, match="nope.txt: no such file"):
        expand_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(SourceError, match="no files match"):
        expand_inputs([str(tmp_path / "*.none")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="directory has no files"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(SourceError, match="unknown builtin corpus"):
        expand_inputs(["builtin:nope"])


def test_builtin_pydoc_topics():
    from pydoc_data.topics import topics

    got = docs(["builtin:pydoc-topics"])
    assert [i for i, _ in got] == [f"pydoc-topics/{k}" for k in sorted(topics) if topics[k].strip()]
    assert dict(got)["pydoc-topics/assert"] == topics["assert"]


def test_builtin_stdlib_expands_to_sorted_python_files():
    units = expand_inputs(["builtin:stdlib"])
    root = Path(sysconfig.get_paths()["stdlib"])
    names = [u.name for u in units]
    assert len(units) > 200
    assert names == sorted(names)
    assert all(n.startswith("stdlib/") and n.endswith(".py") for n in names)
    assert "stdlib/os.py" in names and "stdlib/json/__init__.py" in names
    assert not any("site-packages/" in n or "__pycache__/" in n for n in names)
    assert all(Path(u.location) == root / u.name.removeprefix("stdlib/") for u in units[:50])


# --- ids -------------------------------------------------------------------------------------------
def test_ids_do_not_depend_on_global_position(tmp_path):
    """Adding an input in front must not rename the documents of the inputs after it."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("p1\n\np2\n\np3")
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "j1"}\n{"text": "j2"}\n')
    (tmp_path / "new.txt").write_text("new doc\n\nanother")
    alone = docs([tmp_path / "d"], text_mode="paragraph")
    grown = docs([tmp_path / "new.txt", tmp_path / "d"], text_mode="paragraph")
    assert grown[2:] == alone
    assert [i for i, _ in alone] == [
        "d/b.jsonl:1",
        "d/b.jsonl:2",
        "d/b.txt:1",
        "d/b.txt:3",
        "d/b.txt:5",
    ]


# --- partition -------------------------------------------------------------------------------------
def test_partition_is_contiguous_and_complete():
    units = [
        Unit("text", f"f{i}", f"f{i}", size) for i, size in enumerate([5, 100, 3, 40, 40, 1, 70, 8])
    ]
    for k in (1, 2, 3, 5, 8):
        parts = partition(units, k)
        assert len(parts) == k
        assert [u for p in parts for u in p] == units  # contiguous runs, in order, nothing lost


def test_partition_with_more_parts_than_units_leaves_empty_parts():
    units = [Unit("text", "a", "a", 10), Unit("text", "b", "b", 10)]
    parts = partition(units, 3)
    assert [u for p in parts for u in p] == units
    assert sum(1 for p in parts if not p) == 1
