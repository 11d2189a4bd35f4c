"""data_prep/atomic.py: the project's one way to replace a file or a directory."""

from __future__ import annotations

import json

import pytest
from zeroforge.data_prep import atomic


def test_write_replaces_and_leaves_no_temporary_file(tmp_path):
    p = tmp_path / "latest"
    atomic.write_bytes(p, b"step_00000001")
    atomic.write_bytes(p, b"step_00000002")
    assert p.read_text() == "step_00000002"
    atomic.write_json(tmp_path / "l.json", {"b": 1, "a": [2]})
    assert json.loads((tmp_path / "l.json").read_text()) == {"a": [2], "b": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["l.json", "latest"]


def test_a_failed_write_keeps_the_old_content(tmp_path):
    p = tmp_path / "ledger.json"
    atomic.write_bytes(p, b"old")

    def half_then_crash(f):
        f.write(b"torn")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic.write_with(p, half_then_crash)
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["ledger.json"]


def test_temp_names_are_recognised_and_replace_dir_moves_a_tree(tmp_path):
    assert atomic.is_temp(atomic.temp_path(tmp_path / "COMMITTED"))
    assert not atomic.is_temp(tmp_path / "rng_rank00000.pt")
    tmp = tmp_path / ".out.tmp"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "sub" / "f").write_text("x")
    atomic.replace_dir(tmp, tmp_path / "out")
    assert (tmp_path / "out" / "sub" / "f").read_text() == "x" and not tmp.exists()
