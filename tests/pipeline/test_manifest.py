"""Manifests and the integrity checks built on them, on real files (no DeepSpeed here; saving
and resuming through a real engine: tests/e2e/test_checkpoint_integrity.py).

- a manifest's CRC-32C of a file equals google_crc32c over its bytes, however the file is cut
  into segments for the thread pool;
- a flipped byte, a truncated, grown or missing file, and a damaged manifest are each one
  problem naming the file;
- a corrupt checkpoint is set aside for good (resume then takes the previous one:
  tests/e2e/test_checkpoint_integrity.py).
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
    monkeypatch.setattr(manifest, "file_entries",
                        lambda paths, threads=None: read.extend(paths) or real(paths, threads))
    ckpt.verify_tag(tag)
    assert tag / "mp_rank_00_model_states.pt" not in read


def test_a_corrupt_checkpoint_is_set_aside_for_good(tmp_path, caplog):
    for step in (5, 10, 15):
        _tag(tmp_path, step)
    _flip(tmp_path / ckpt.tag_for(15) / "mp_rank_00_model_states.pt", 7)
    problems = ckpt.verify_on_ranks(tmp_path / ckpt.tag_for(15), rank=0)
    assert len(problems) == 1 and "step_00000015/mp_rank_00_model_states.pt: checksum" in problems[0]
    with caplog.at_level(logging.ERROR):
        ckpt.set_aside(tmp_path / ckpt.tag_for(15), rank=0)
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("step_00000015.corrupt-")]
    assert len(aside) == 1 and "set aside as " + aside[0] in caplog.text
    # Never tried again (no longer a tag), never pruned; `latest` names the newest one left.
    assert [s for s, _ in ckpt.committed(tmp_path)] == [5, 10]
    assert (tmp_path / ckpt.LATEST).read_text() == "step_00000010"
    ckpt._prune(tmp_path, keep_last=1)
    assert (tmp_path / aside[0]).is_dir()
    # The same step set aside twice (trained again, corrupt again) keeps both copies.
    _tag(tmp_path, 15)
    ckpt.set_aside(tmp_path / ckpt.tag_for(15), rank=0)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("step_00000015.")]) == 2


def test_a_check_runs_beside_the_caller_and_reports_on_join(tmp_path):
    tag = _tag(tmp_path, 5)
    os.truncate(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt", 0)
    pending = ckpt.PendingCheck(tag, rank=0)
    (tag / "unrelated").write_bytes(b"the caller goes on meanwhile")
    assert pending.problems() == [
        f"{tag / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'}: truncated (0 bytes, the manifest "
        "says 5000)"]


def test_legacy_checkpoint_counts_as_sound_with_a_warning(tmp_path, caplog):
    tag = _tag(tmp_path, 3, legacy=True)  # committed before checkpoints had manifests
    with caplog.at_level(logging.WARNING):
        assert ckpt.verify_tag(tag) == []
    assert "before checkpoints had manifests" in caplog.text
