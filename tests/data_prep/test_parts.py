"""Multi-part builds (`--num-parts K --part I`, Slurm job-array defaults) and `--finalize`:
the stitched store reads exactly like a single build of the same inputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from zeroforge.data_prep.parts import part_dir
from zeroforge.data_prep.store import TokenStore
from zeroforge.data_prep.verify import verify_store

from .conftest import (
    TINY_CLI,
    assert_docs_equal,
    read_all_docs,
    root_attrs,
    set_root_attrs,
    store_digest,
)

PREP = ["--val-fraction", "0.3", "--text-mode", "paragraph", *TINY_CLI]


def _inputs(corpus, n_files: int | None) -> list[str]:
    if n_files is None:
        return [str(corpus.root)]
    return [str(corpus.root / f"doc_{i:02d}.txt") for i in range(n_files)]


def _prep(zf, inputs, out, *extra):
    r = zf("prep", *inputs, "--out", out, *PREP, *extra)
    assert r.rc == 0, r.text
    return r


def _parts(zf, inputs, out, k, only=None):
    for i in range(k) if only is None else only:
        _prep(zf, inputs, out, "--num-parts", str(k), "--part", str(i))


def assert_reads_like(stitched: Path, single: Path, rng: random.Random) -> None:
    a, b = root_attrs(stitched), root_attrs(single)
    for key in (
        "counts",
        "checksums",
        "prep_config",
        "prep_config_hash",
        "sources",
        "tokenizer",
        "dtype",
        "skipped",
        "text_bytes",
        "complete",
    ):
        assert a[key] == b[key], key
    s, t = TokenStore.open(stitched), TokenStore.open(single)
    assert s.fingerprint == t.fingerprint
    for name in ("train", "val"):
        x, y = s.split(name), t.split(name)
        assert (x.n_docs, x.n_tokens) == (y.n_docs, y.n_tokens)
        assert np.array_equal(x.doc_offsets, y.doc_offsets)
        everything = y.tokens(0, y.n_tokens)
        assert np.array_equal(x.tokens(0, x.n_tokens), everything)
        assert_docs_equal(read_all_docs(x), read_all_docs(y))
        # Windows around every segment boundary, and random ones.
        edges = [lg for lg, _, _ in x.segments] + [lg + n for lg, _, n in x.segments]
        for e in edges:
            for lo, hi in ((e - 700, e + 700), (e - 1, e + 1), (e - 5000, e + 3)):
                lo, hi = max(lo, 0), min(hi, x.n_tokens)
                assert np.array_equal(x.tokens(lo, hi), everything[lo:hi]), (name, lo, hi)
        for _ in range(200):
            lo = rng.randrange(x.n_tokens)
            hi = min(x.n_tokens, lo + rng.randrange(1, 9000))
            assert np.array_equal(x.tokens(lo, hi), everything[lo:hi]), (name, lo, hi)
    assert verify_store(str(stitched)) == []


@pytest.mark.parametrize("n_files", [None, 2], ids=["6-files-3-parts", "2-files-3-parts-one-empty"])
def test_three_parts_then_finalize_reads_like_a_single_build(zf, corpus, tmp_path, n_files):
    inputs = _inputs(corpus, n_files)
    _prep(zf, inputs, tmp_path / "single")
    out = tmp_path / "multi"
    _parts(zf, inputs, out, 3)
    part_docs = []
    for i in range(3):
        attrs = root_attrs(part_dir(out, i, 3))
        assert attrs["complete"] and attrs["prep_config"]["part"] == [i, 3]
        part_docs.append(sum(c["docs"] for c in attrs["counts"].values()))
    if n_files == 2:
        assert 0 in part_docs, f"expected an empty part, got {part_docs} documents"
    else:
        assert all(part_docs)
    r = zf("prep", "--finalize", out)
    assert r.rc == 0, r.text
    assert not (out / "parts").exists() and not (out / "_finalize.json").exists()
    assert_reads_like(out, tmp_path / "single", random.Random(n_files or 0))
    segments = root_attrs(out)["segments"]
    if n_files is None:
        assert (
            len(segments["train"]) == 3 and segments != root_attrs(tmp_path / "single")["segments"]
        )
        # Each part starts on a shard boundary of the physical array.
        assert all(ph % 4096 == 0 for _, ph, _ in segments["train"])


def test_rerunning_finalize_is_a_noop(zf, corpus, tmp_path):
    out = tmp_path / "multi"
    _parts(zf, _inputs(corpus, None), out, 2)
    assert zf("prep", "--finalize", out).rc == 0
    digest = store_digest(out)
    r = zf("prep", "--finalize", out)
    assert r.rc == 0 and "already finalized" in r.log
    assert store_digest(out) == digest


def test_slurm_array_environment_picks_the_part(zf, corpus, tmp_path, monkeypatch):
    inputs = _inputs(corpus, None)
    _prep(zf, inputs, tmp_path / "single")
    out = tmp_path / "multi"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    for task in (0, 1, 2):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        _prep(zf, inputs, out)
        assert root_attrs(part_dir(out, task, 3))["complete"]
    assert sorted(p.name for p in (out / "parts").iterdir()) == [
        f"part-0000{i}-of-00003" for i in range(3)
    ]
    assert zf("prep", "--finalize", out).rc == 0
    assert_reads_like(out, tmp_path / "single", random.Random(1))


def test_resubmitted_array_task_builds_its_own_part(zf, corpus, tmp_path, monkeypatch):
    """`sbatch --array=1` again after a failure: the task id is the part, --num-parts the count."""
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    _prep(zf, [*_inputs(corpus, None), "--num-parts", "2"], tmp_path / "m")
    assert [p.name for p in (tmp_path / "m" / "parts").iterdir()] == ["part-00001-of-00002"]


def test_finalize_refuses_a_missing_part(zf, corpus, tmp_path):
    out = tmp_path / "multi"
    _parts(zf, _inputs(corpus, None), out, 3, only=[0, 2])
    r = zf("prep", "--finalize", out)
    assert r.rc == 2 and "missing: [1]" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert not (out / "zarr.json").exists() and (out / "parts").is_dir()


def test_finalize_refuses_an_unfinished_part(zf, corpus, tmp_path):
    out = tmp_path / "multi"
    _parts(zf, _inputs(corpus, None), out, 3)
    unfinished = Path(part_dir(out, 1, 3))
    set_root_attrs(unfinished, complete=False)
    r = zf("prep", "--finalize", out)
    assert r.rc == 2 and "part-00001-of-00003" in r.err and "not finished" in r.err
    set_root_attrs(unfinished, complete=True)
    (unfinished / "_build").mkdir()  # a ledger dir: the part was interrupted
    (unfinished / "_build" / "ledger.json").write_text(json.dumps({"commit": 1}))
    r = zf("prep", "--finalize", out)
    assert r.rc == 2 and "not finished" in r.err
    assert not (out / "zarr.json").exists()
    # Once the part is finished, finalize goes through.
    (unfinished / "_build" / "ledger.json").unlink()
    (unfinished / "_build").rmdir()
    assert zf("prep", "--finalize", out).rc == 0


def test_finalize_refuses_parts_built_with_other_settings(zf, corpus, tmp_path):
    out = tmp_path / "multi"
    inputs = _inputs(corpus, None)
    _prep(zf, inputs, out, "--num-parts", "2", "--part", "0")
    r = zf(
        "prep",
        *inputs,
        "--out",
        out,
        "--val-fraction",
        "0.5",
        "--text-mode",
        "paragraph",
        *TINY_CLI,
        "--num-parts",
        "2",
        "--part",
        "1",
    )
    assert r.rc == 0, r.text
    r = zf("prep", "--finalize", out)
    assert r.rc == 2 and "different settings" in r.err


def test_part_arguments_are_checked(zf, corpus, tmp_path):
    inputs = _inputs(corpus, None)
    r = zf("prep", *inputs, "--out", tmp_path / "m", "--part", "0")
    assert r.rc == 2 and "--num-parts and --part go together" in r.err
    r = zf("prep", *inputs, "--out", tmp_path / "m", "--num-parts", "2", "--part", "2")
    assert r.rc == 2 and "--part must be in [0, 2)" in r.err
    assert not (tmp_path / "m").exists()


def test_interrupted_finalize_resumes(zf, corpus, tmp_path, monkeypatch):
    """finalize dies after moving some shard files (simulated: the third move of a part's shard
    raises, as a kill would stop it there); running it again finishes the same store."""
    import os

    inputs = _inputs(corpus, None)
    _prep(zf, inputs, tmp_path / "single")
    out = tmp_path / "multi"
    _parts(zf, inputs, out, 3)
    real_replace, moves = os.replace, []

    def dying_replace(src, dst):
        if f"{os.sep}parts{os.sep}" in str(src) and f"{os.sep}c{os.sep}" in str(src):
            moves.append(src)
            if len(moves) == 3:
                raise KeyboardInterrupt("simulated kill during finalize")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    r = zf("prep", "--finalize", out)  # the command reports an interruption in one line
    assert r.rc == 130 and "interrupted: rerun the same command" in r.err, r.err
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "_finalize.json").exists()
    r = zf("prep", "--finalize", out)
    assert r.rc == 0, r.text
    assert_reads_like(out, tmp_path / "single", random.Random(5))


def test_finalize_leaves_only_the_store(zf, corpus, tmp_path):
    """No plan, no lock file, no parts: the stitched store has the files of a single build
    (the token shards of each part are renumbered into place)."""
    out = tmp_path / "multi"
    _parts(zf, _inputs(corpus, None), out, 2)
    assert zf("prep", "--finalize", out).rc == 0
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert not [n for n in names if n.startswith(("parts/", "_finalize", "."))], names
