"""Non-finite losses on one rank (ZEROFORGE_DEBUG_NAN_STEPS poisons the last rank's loss): the
step is skipped on every rank with the parameters unchanged, counted and logged, and more than
train.max_nonfinite_in_a_row in a row stops the run with an error naming the step.

Stage 0 takes zeroforge's own skip path (DeepSpeed would apply the NaN update there); ZeRO-2
relies on DeepSpeed discarding a step whose gradient norm is not finite."""

from __future__ import annotations

import pytest
from zeroforge.pipeline.training.checkpoint import committed

from tests.e2e.conftest import checksums, launch, tiny_overrides


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_steps_are_skipped_then_stop(tiny_store, tmp_path, stage):
    overrides = tiny_overrides(tiny_store, tmp_path, **{
        "deepspeed.zero_optimization.stage": stage, "train.max_steps": 12,
        "train.max_nonfinite_in_a_row": 2, "checkpoint.every": 4, "train.grad_accum": 2})
    result = launch(tmp_path, overrides, env={"ZEROFORGE_DEBUG_NAN_STEPS": "3,4,7,8,9",
                                              "ZEROFORGE_DEBUG_CHECKSUM": "1"})
    assert result.returncode == 1, result.output[-4000:]
    assert "step 9: 3 non-finite steps in a row" in result.output
    by_step = {r["step"]: r for r in result.metrics()}
    assert max(by_step) == 8, "step 9 raised before logging"
    # Skipped steps leave every rank's parameters exactly as they were.
    assert checksums(by_step[2]) == checksums(by_step[3]) == checksums(by_step[4])
    assert checksums(by_step[5]) != checksums(by_step[4])
    for s, r in by_step.items():
        sums = checksums(r)
        assert sums[0] == sums[1], f"ranks disagree at step {s}"
    assert [by_step[s]["train/skipped_steps"] for s in (2, 3, 4, 5, 8)] == [0, 1, 2, 2, 4]
    assert by_step[3]["train/loss"] == "nan" and isinstance(by_step[5]["train/loss"], float)
    assert "step 3: non-finite loss" in result.output
    # Checkpoints before the failure are fine; nothing is written for the failed step.
    assert [s for s, _ in committed(tmp_path / "checkpoints")] == [4, 8]
