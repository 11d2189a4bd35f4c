"""Exact resume and crash-safe checkpoints, ZeRO-2 with 2 CPU ranks in fp32.

- A run killed with SIGKILL (all ranks, via ZEROFORGE_DEBUG_KILL_AFTER_STEP) after step 13, with
  a checkpoint at step 10, and relaunched with the same command, reproduces the uninterrupted
  run's losses for steps 11-20 bitwise and ends with identical parameters.
- A run killed in the middle of a checkpoint save (ZEROFORGE_DEBUG_KILL_IN_SAVE) leaves a
  partial checkpoint that the relaunch ignores: it resumes from the previous committed one.
"""

from __future__ import annotations

import pytest
import torch

from tests.e2e.conftest import launch, losses, tiny_overrides

STEPS = 20


def _overrides(store, run_dir, **extra):
    return tiny_overrides(store, run_dir, **{
        "deepspeed.zero_optimization.stage": 2, "train.max_steps": STEPS,
        "train.grad_accum": 2, "checkpoint.every": 10, "checkpoint.keep_last": 3,
        "train.precision": "fp32", **extra})


def _module_state(run_dir, step):
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.fixture(scope="module")
def exact_runs(tiny_store, tmp_path_factory):
    ref_dir = tmp_path_factory.mktemp("uninterrupted")
    ref = launch(ref_dir, _overrides(tiny_store, ref_dir))
    assert ref.returncode == 0, ref.output[-4000:]

    run_dir = tmp_path_factory.mktemp("killed")
    killed = launch(run_dir, _overrides(tiny_store, run_dir),
                    env={"ZEROFORGE_DEBUG_KILL_AFTER_STEP": "13"})
    assert killed.returncode != 0
    assert max(losses(killed.metrics())) == 13, "the kill happened after step 13"
    resumed = launch(run_dir, _overrides(tiny_store, run_dir))
    assert resumed.returncode == 0, resumed.output[-4000:]
    return ref, killed, resumed


def test_zero2_loss_falls(exact_runs):
    ref, _, _ = exact_runs
    curve = losses(ref.metrics())
    assert list(curve) == list(range(1, STEPS + 1))
    assert curve[STEPS] < curve[1] - 0.5


def test_resume_is_bitwise_exact(exact_runs):
    ref, _, resumed = exact_runs
    assert "resuming from" in resumed.output and "step_00000010" in resumed.output
    a, b = losses(ref.metrics()), losses(resumed.metrics())
    assert list(b) == list(range(1, STEPS + 1)), "steps 11-13 of the killed run were replaced"
    assert [a[s] for s in range(11, STEPS + 1)] == [b[s] for s in range(11, STEPS + 1)]
    final_a, final_b = _module_state(ref.run_dir, STEPS), _module_state(resumed.run_dir, STEPS)
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name


def test_kill_during_save_resumes_from_previous(tiny_store, tmp_path):
    overrides = _overrides(tiny_store, tmp_path, **{"train.max_steps": 8, "checkpoint.every": 3,
                                                    "train.grad_accum": 1})
    crashed = launch(tmp_path, overrides, env={"ZEROFORGE_DEBUG_KILL_IN_SAVE": "6"})
    assert crashed.returncode != 0
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "step_00000003" / "COMMITTED").is_file()
    assert (ckpts / "step_00000006").is_dir(), "the save had started"
    assert not (ckpts / "step_00000006" / "COMMITTED").exists()
    assert (ckpts / "latest").read_text() == "step_00000003"

    again = launch(tmp_path, overrides)
    assert again.returncode == 0, again.output[-4000:]
    assert "resuming from" in again.output and "step_00000003" in again.output
    assert list(losses(again.metrics())) == list(range(1, 9))
    assert (ckpts / "step_00000006" / "COMMITTED").is_file()
    assert (ckpts / "latest").read_text() == "step_00000008"
