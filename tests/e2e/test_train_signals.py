"""Preemption with ZeRO-3 on 2 CPU ranks: SIGTERM (or SIGUSR1) to any one rank makes every rank
stop at the same step boundary, save a checkpoint and exit with EXIT_PREEMPTED (75); the same
command then resumes. The final run is also the ZeRO-3 evidence (loss falls, ranks agree), and
it logs samples at its final eval: both ranks generate in lockstep through the partitioned
model (pipeline/training/loop.py)."""

from __future__ import annotations

import json
import signal

import pytest
from zeroforge.pipeline.errors import EXIT_PREEMPTED
from zeroforge.pipeline.training.checkpoint import latest_committed

from tests.e2e.conftest import (
    checksums,
    finish,
    launch,
    losses,
    rank_processes,
    start,
    tiny_overrides,
    wait_for_step,
)

STEPS = 24


def _preempt(run_dir, overrides, at_step, rank, sig):
    proc, log = start(run_dir, overrides, env={"ZEROFORGE_DEBUG_CHECKSUM": "1"})
    wait_for_step(run_dir, proc, at_step)
    ranks = rank_processes(proc)
    assert rank in ranks, f"rank {rank} not found: {ranks}"
    ranks[rank].send_signal(sig)
    return finish(proc, log, run_dir)


@pytest.fixture(scope="module")
def preempted_runs(tiny_store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("signals")
    overrides = tiny_overrides(tiny_store, run_dir, **{
        "deepspeed.zero_optimization.stage": 3, "train.max_steps": STEPS,
        "checkpoint.every": 1000})
    first = _preempt(run_dir, overrides, 3, 1, signal.SIGTERM)
    step1 = latest_committed(run_dir / "checkpoints")
    second = _preempt(run_dir, overrides, step1[0] + 2, 0, signal.SIGUSR1)
    step2 = latest_committed(run_dir / "checkpoints")
    sampled = [*overrides, "tracking.backend=mlflow", "tracking.system_metrics=false",
               "tracking.experiment=e2e-zero3", "train.sample_tokens=6"]
    final = launch(run_dir, sampled, env={"ZEROFORGE_DEBUG_CHECKSUM": "1"})
    return first, step1, second, step2, final


def test_sigterm_to_one_rank_checkpoints_and_exits_75(preempted_runs):
    first, step1, *_ = preempted_runs
    assert first.returncode == EXIT_PREEMPTED, first.output[-4000:]
    assert step1 is not None and 3 <= step1[0] < STEPS
    assert max(losses(first.metrics())) == step1[0], "stopped right after the checkpoint"


def test_sigusr1_relaunch_resumes_and_stops_again(preempted_runs):
    _, step1, second, step2, _ = preempted_runs
    assert second.returncode == EXIT_PREEMPTED, second.output[-4000:]
    assert "resuming from" in second.output
    assert step1[0] < step2[0] < STEPS


def test_final_relaunch_completes_zero3(preempted_runs):
    *_, final = preempted_runs
    assert final.returncode == 0, final.output[-4000:]
    records = final.metrics()
    curve = losses(records)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert len([r for r in records if "train/loss" in r]) == STEPS, "each step logged once"
    assert curve[STEPS] < curve[1] - 0.5
    last = [r for r in records if r["step"] == STEPS and "train/loss" in r][-1]
    sums = checksums(last)
    assert len(sums) == 2 and sums[0] == sums[1]


def test_final_relaunch_logs_samples_under_zero3(preempted_runs):
    from mlflow.tracking import MlflowClient

    *_, final = preempted_runs
    client = MlflowClient(f"sqlite:///{final.run_dir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("e2e-zero3").experiment_id])
    path = client.download_artifacts(run.info.run_id, f"samples/step_{STEPS:07d}.json",
                                     str(final.run_dir / "downloaded"))
    samples = json.loads(open(path).read())
    assert [s["prompt"] for s in samples] == ["The", "Once upon a time"]
    assert all(isinstance(s["greedy"], str) and isinstance(s["top_k_40"], str) for s in samples)
