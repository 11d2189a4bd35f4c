"""How the loop counts skipped steps: fp16 loss-scale overflows apart from non-finite losses.

What could not run here: fp16 itself. DeepSpeed's fp16 loss scaler needs a GPU (the run config
refuses ``train.precision=fp16`` on CPU), so no real overflow is produced. What runs is the
accounting on the values an fp16 engine reports: ``classify`` turns (agreed non-finite loss
flag, ``engine.was_step_applied()``, ``engine.fp16_enabled()``) into an outcome, and
``count_step`` counts it against the two limits, on the real ``LoopState`` and ``TrainConfig``.
The non-finite path runs for real in tests/pipeline/test_training_faults.py and
tests/e2e/test_train_nonfinite.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from zeroforge.pipeline.config import build_run_config
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.training.config import TrainConfig
from zeroforge.pipeline.training.loop import count_step
from zeroforge.pipeline.training.state import LoopState, Outcome
from zeroforge.pipeline.training.step import TrainingError, classify

LOADER = SimpleNamespace(global_batch=8, tokens_per_global_step=8 * 64)
A, N, OV = Outcome.APPLIED, Outcome.NONFINITE, Outcome.OVERFLOW


def test_classify():
    assert classify(nonfinite_loss=True, applied=False, fp16=True) is N
    assert classify(nonfinite_loss=False, applied=True, fp16=True) is A
    # Finite losses but no update: fp16's scaler overflowed; in fp32/bf16 the gradients were
    # not finite (ZeRO's invalid-gradient-norm check), a real non-finite step.
    assert classify(nonfinite_loss=False, applied=False, fp16=True) is OV
    assert classify(nonfinite_loss=False, applied=False, fp16=False) is N


def _run(outcomes, **limits):
    state, cfg = LoopState(), TrainConfig(**limits)
    warnings = [count_step(state, o, cfg, LOADER) for o in outcomes]
    return state, warnings


def test_a_healthy_fp16_start_is_not_stopped():
    # The scaler halving from 2^16 to 2^12 (hysteresis 2: 6 overflows in a row), then training;
    # before, these counted as non-finite steps and max_nonfinite_in_a_row=3 stopped the run.
    state, warnings = _run([OV] * 6 + [A] * 3, max_nonfinite_in_a_row=3)
    assert state.step == 9 and state.samples == 72 and state.tokens == 72 * 64
    assert state.skipped_steps == 6 and state.overflow_steps == 6
    assert state.nonfinite_in_a_row == 0 and state.overflows_in_a_row == 0
    assert warnings[5] == ("step 6: fp16 loss-scale overflow; step skipped (6 in a row, "
                           "6 in total)") and warnings[6] is None


def test_overflows_neither_end_nor_extend_a_run_of_nonfinite_steps():
    state, _ = _run([N, OV, N, OV, N], max_nonfinite_in_a_row=3)
    assert state.nonfinite_in_a_row == 3 and state.overflows_in_a_row == 2
    with pytest.raises(TrainingError, match=r"step 6: 4 non-finite steps in a row \(more than "
                                            r"train.max_nonfinite_in_a_row=3\)"):
        _run([N, OV, N, OV, N, N], max_nonfinite_in_a_row=3)


def test_overflows_have_their_own_limit():
    state, _ = _run([OV] * 4, max_overflows_in_a_row=4)
    assert state.overflows_in_a_row == 4
    with pytest.raises(TrainingError, match=r"step 5: 5 fp16 loss-scale overflows in a row "
                                            r"\(more than train.max_overflows_in_a_row=4\)"):
        _run([OV] * 5, max_overflows_in_a_row=4)


def test_the_limit_is_a_config_key():
    assert TrainConfig().max_overflows_in_a_row == 32
    with pytest.raises(ConfigError, match="train.max_overflows_in_a_row must be >= 0"):
        build_run_config({"data": {"store": "/s"}, "train": {"max_overflows_in_a_row": -1}})
