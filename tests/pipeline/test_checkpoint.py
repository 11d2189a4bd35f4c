"""Checkpoint bookkeeping without DeepSpeed: which tags count as committed, pruning, the
compatibility check. (Saving and resuming through a real engine: tests/e2e/test_train_resume.py.)"""

from __future__ import annotations

import json

import pytest
from zeroforge.model import EncDecConfig, GPT2Config
from zeroforge.pipeline.training import checkpoint as ckpt
from zeroforge.pipeline.training.config import CheckpointConfig


def _tag(root, step, commit=True):
    d = root / ckpt.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if commit:
        (d / ckpt.MARKER).write_text(json.dumps({"step": step}))


def test_committed_partial_latest(tmp_path):
    assert ckpt.latest_committed(tmp_path / "none") is None
    _tag(tmp_path, 5)
    _tag(tmp_path, 10)
    _tag(tmp_path, 15, commit=False)
    (tmp_path / "step_junk").mkdir()
    assert ckpt.committed(tmp_path) == [(5, "step_00000005"), (10, "step_00000010")]
    assert ckpt.partial(tmp_path) == [(15, "step_00000015")]
    assert ckpt.latest_committed(tmp_path) == (10, "step_00000010")
    assert ckpt.read_marker(tmp_path, "step_00000010")["step"] == 10


def test_prune_keeps_last_k_and_drops_stale_partials(tmp_path):
    for s in (1, 2, 3, 4):
        _tag(tmp_path, s)
    _tag(tmp_path, 0, commit=False)   # older than the newest commit: abandoned
    _tag(tmp_path, 9, commit=False)   # newer: may be in flight, kept
    ckpt._prune(tmp_path, keep_last=2)
    assert [s for s, _ in ckpt.committed(tmp_path)] == [3, 4]
    assert [s for s, _ in ckpt.partial(tmp_path)] == [9]


def _saved(config, family="gpt2"):
    return {"format_version": ckpt.FORMAT_VERSION, "model_family": family,
            "model_config": config.to_dict(), "store_fingerprint": "abc"}


def test_check_compatible_refuses_changed_model_or_store():
    tiny = GPT2Config.preset("gpt2-tiny")
    saved = _saved(tiny)
    ckpt.check_compatible(saved, tiny, "abc", "x")
    wider = GPT2Config.preset("gpt2-tiny", n_embd=128)
    with pytest.raises(ckpt.ResumeError, match=r"model.n_embd: 64 -> 128"):
        ckpt.check_compatible(saved, wider, "abc", "x")
    with pytest.raises(ckpt.ResumeError, match="token store changed"):
        ckpt.check_compatible(saved, tiny, "def", "x")


def test_check_compatible_allows_changes_that_leave_the_weights_alone():
    # Natural on resume: activation checkpointing to fit fewer GPUs, another dropout.
    saved = _saved(GPT2Config.preset("gpt2-tiny"))
    now = GPT2Config.preset("gpt2-tiny", activation_checkpointing=True, dropout=0.1,
                            init_std=0.01)
    ckpt.check_compatible(saved, now, "abc", "x")
    t5 = EncDecConfig.preset("t5-tiny")
    ckpt.check_compatible(_saved(t5, "encdec"),
                          EncDecConfig.preset("t5-tiny", activation_checkpointing=True,
                                              dropout=0.2), "abc", "x")


def test_check_compatible_names_a_family_change():
    t5 = EncDecConfig.preset("t5-tiny")
    with pytest.raises(ckpt.ResumeError) as e:
        ckpt.check_compatible(_saved(t5, "encdec"), GPT2Config.preset("gpt2-tiny"), "abc", "x")
    assert "model.family: 'encdec' -> 'gpt2'" in str(e.value)
    assert "model.d_model" not in str(e.value), "one line, not every field of two families"
    # Markers written before the family was recorded: it is recognised from the fields.
    old = {k: v for k, v in _saved(t5, "encdec").items() if k != "model_family"}
    with pytest.raises(ckpt.ResumeError, match="model.family: 'encdec' -> 'gpt2'"):
        ckpt.check_compatible(old, GPT2Config.preset("gpt2-tiny"), "abc", "x")


def test_config_validation():
    assert CheckpointConfig().problems() == []
    msgs = "\n".join(CheckpointConfig(every=-1, keep_last=0).problems())
    assert "checkpoint.every" in msgs and "checkpoint.keep_last" in msgs
    assert CheckpointConfig().path("/r").as_posix() == "/r/checkpoints"
    assert CheckpointConfig(dir="/c").path("/r").as_posix() == "/c"
