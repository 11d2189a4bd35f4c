"""Manifests and the integrity checks built on them, on real files (no DeepSpeed here; saving
and resuming through a real engine: tests/e2e/test_checkpoint_integrity.py).

- a manifest's CRC-32C of a file equals google_crc32c over its bytes, however the file is cut
  into segments for the thread pool;
- a flipped byte, a truncated, grown or missing file, and a damaged manifest are each one
  problem naming the file;
- resume takes the newest checkpoint that verifies, sets a corrupt one aside for good, and
  refuses when every committed checkpoint is corrupt.
"""

from __future__ import annotations

import json
import logging
import os

import google_crc32c
import pytest
from zeroforge.pipeline.training import checkpoint as ckpt
from zeroforge.pipeline.training import manifest


def _tag(root, step, files=None, legacy=False):
    """A committed tag written the way checkpoint.save writes one (manifest, then marker)."""
    tag_dir = root / ckpt.tag_for(step)
    tag_dir.mkdir(parents=True)
    for name, data in (files or {"mp_rank_00_model_states.pt": os.urandom(3000),
                                 "zero_pp_rank_1_mp_rank_00_optim_states.pt": os.urandom(5000),
                                 "rng_rank00001.pt": b"rng"}).items():
        (tag_dir / name).write_bytes(data)
    names = manifest.data_files(tag_dir, recursive=False, exclude=[ckpt.MARKER])
    marker = {"step": step}
    if not legacy:
        entries = manifest.file_entries([tag_dir / n for n in names])
        marker["manifest_crc32c"] = manifest.write(tag_dir, dict(zip(names, entries, strict=True)))
    (tag_dir / ckpt.MARKER).write_text(json.dumps(marker))
    return tag_dir


def _flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("segment", [64, 1000, 4096, 1 << 20])
def test_segmented_crc_equals_whole_file_crc(tmp_path, monkeypatch, segment):
    monkeypatch.setattr(manifest, "_SEGMENT", segment)
    monkeypatch.setattr(manifest, "_CHUNK", 100)
    paths = []
    for size in (0, 1, 99, 4096, 12345):
        p = tmp_path / f"f{size}"
        p.write_bytes(os.urandom(size))
        paths.append(p)
    got = manifest.file_entries(paths)
    assert got == [{"size": p.stat().st_size,
                    "crc32c": f"{google_crc32c.value(p.read_bytes()):08x}"} for p in paths]


def test_data_files_leave_out_manifest_marker_and_work_in_progress(tmp_path):
    for name in ("a.pt", "COMMITTED", "MANIFEST.json", ".a.pt.123.tmp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "universal" / "zero").mkdir(parents=True)
    (tmp_path / "universal" / "zero" / "p.pt").write_bytes(b"x")
    (tmp_path / ".universal.tmp9").mkdir()
    (tmp_path / ".universal.tmp9" / "q.pt").write_bytes(b"x")
    assert manifest.data_files(tmp_path, recursive=False, exclude=["COMMITTED"]) == ["a.pt"]
    assert manifest.data_files(tmp_path, recursive=True, exclude=["COMMITTED"]) == [
        "a.pt", "universal/zero/p.pt"]


def test_sound_checkpoint_verifies(tmp_path):
    tag = _tag(tmp_path, 10)
    assert ckpt.verify_tag(tag) == []
    assert ckpt.verify_on_ranks(tag, 0) == []  # one process: the same check


@pytest.mark.parametrize("damage,expected", [
    (lambda t: _flip(t / "zero_pp_rank_1_mp_rank_00_optim_states.pt", 4000),
     "zero_pp_rank_1_mp_rank_00_optim_states.pt: checksum mismatch"),
    (lambda t: os.truncate(t / "mp_rank_00_model_states.pt", 1000),
     "mp_rank_00_model_states.pt: truncated (1000 bytes, the manifest says 3000)"),
    (lambda t: (t / "rng_rank00001.pt").write_bytes(b"rng+"),
     "rng_rank00001.pt: grown (4 bytes, the manifest says 3)"),
    (lambda t: (t / "rng_rank00001.pt").unlink(), "rng_rank00001.pt: missing"),
    (lambda t: _flip(t / "MANIFEST.json", 20),
     "MANIFEST.json: checksum mismatch"),
    (lambda t: (t / "MANIFEST.json").unlink(), "MANIFEST.json: missing"),
    (lambda t: (t / "COMMITTED").write_text("{not json"), "COMMITTED: unreadable commit marker"),
])
def test_each_fault_is_one_problem_naming_its_file(tmp_path, damage, expected):
    tag = _tag(tmp_path, 10)
    damage(tag)
    problems = ckpt.verify_tag(tag)
    assert len(problems) == 1 and expected in problems[0], problems
    assert str(tag) in problems[0]
    message = ckpt.corrupt_message(tag, problems)
    assert "\n" not in message and expected in message


def test_a_truncated_file_is_caught_without_reading_it(tmp_path, monkeypatch):
    tag = _tag(tmp_path, 10)
    os.truncate(tag / "mp_rank_00_model_states.pt", 10)
    read = []
    real = manifest.file_entries
    monkeypatch.setattr(manifest, "file_entries", lambda paths: read.extend(paths) or real(paths))
    ckpt.verify_tag(tag)
    assert tag / "mp_rank_00_model_states.pt" not in read


def test_resume_falls_back_past_a_corrupt_checkpoint_and_sets_it_aside(tmp_path, caplog):
    for step in (5, 10, 15):
        _tag(tmp_path, step)
    _flip(tmp_path / ckpt.tag_for(15) / "mp_rank_00_model_states.pt", 7)
    with caplog.at_level(logging.ERROR):
        chosen, corrupt = ckpt.choose_resume(tmp_path, rank=0)
    assert chosen == (10, "step_00000010")
    assert len(corrupt) == 1 and "step_00000015/mp_rank_00_model_states.pt: checksum" in corrupt[0]
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("step_00000015.corrupt-")]
    assert len(aside) == 1 and "set aside as " + aside[0] in caplog.text
    # Never tried again: the next start finds the good one at once, and pruning ignores it.
    assert [s for s, _ in ckpt.committed(tmp_path)] == [5, 10]
    assert ckpt.choose_resume(tmp_path, rank=0) == ((10, "step_00000010"), [])
    assert (tmp_path / ckpt.LATEST).read_text() == "step_00000010"


def test_resume_refuses_when_every_checkpoint_is_corrupt(tmp_path):
    for step in (5, 10):
        tag = _tag(tmp_path, step)
        os.truncate(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt", 0)
    with pytest.raises(ckpt.CorruptCheckpointError, match="every committed checkpoint in .* is "
                                                          "corrupt .* refusing to start over"):
        ckpt.choose_resume(tmp_path, rank=0)
    assert ckpt.committed(tmp_path) == []  # both set aside: a requeue would not retry them


def test_no_checkpoint_and_legacy_checkpoint(tmp_path, caplog):
    assert ckpt.choose_resume(tmp_path / "none", rank=0) == (None, [])
    _tag(tmp_path, 3, legacy=True)  # committed before checkpoints had manifests
    with caplog.at_level(logging.WARNING):
        assert ckpt.choose_resume(tmp_path, rank=0) == ((3, "step_00000003"), [])
    assert "before checkpoints had manifests" in caplog.text
