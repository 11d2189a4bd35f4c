"""Checkpoint integrity with 2 real DeepSpeed ranks (ZeRO-2, CPU, fp32).

- Every committed tag carries a manifest of every rank's files (gathered to rank 0 before the
  commit), and `zeroforge verify` accepts the run directory, the checkpoint directory and a tag.
- A flipped byte in rank 1's optimizer shard of the newest checkpoint: the relaunch notices it
  while DeepSpeed reads (rank 1 checks its own shard beside the load, all ranks agree before
  anything loaded is used), sets that checkpoint aside, resumes from the previous one with a
  fresh engine, a loud warning and an MLflow tag, and reproduces the original run's losses
  bitwise: it never trained from the bad bytes.
- When every committed checkpoint is corrupt the run refuses to start over: exit 1, one line.
- At ZeRO-3, where DeepSpeed's load ends in a collective, a shard only rank 1 reads, cut short
  (DeepSpeed would fail to read it on rank 1 alone), is refused by both ranks together.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from zeroforge.pipeline.errors import EXIT_FAILED
from zeroforge.pipeline.training import checkpoint as ckpt

from tests.e2e.conftest import PYTHON, REPO, launch, losses, tiny_overrides


def _overrides(store, run_dir, steps):
    return tiny_overrides(store, run_dir, **{
        "deepspeed.zero_optimization.stage": 2, "train.max_steps": steps,
        "checkpoint.every": 2, "checkpoint.keep_last": 3, "tracking.backend": "mlflow",
        "tracking.system_metrics": "false"})


def _zeroforge(*args):
    return subprocess.run([PYTHON, "-m", "zeroforge.launch", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def fallback(tiny_store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("integrity")
    first = launch(run_dir, _overrides(tiny_store, run_dir, 4))
    assert first.returncode == 0, first.output[-4000:]
    pristine = tmp_path_factory.mktemp("pristine") / "run"
    shutil.copytree(run_dir, pristine)
    shard = run_dir / "checkpoints" / ckpt.tag_for(4) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x04
    shard.write_bytes(bytes(data))
    again = launch(run_dir, _overrides(tiny_store, run_dir, 6))
    return first, again, pristine


def test_manifest_lists_every_ranks_files(fallback):
    _, _, pristine = fallback
    tag = pristine / "checkpoints" / ckpt.tag_for(4)
    listed = json.loads((tag / "MANIFEST.json").read_text())["files"]
    assert set(listed) == {"mp_rank_00_model_states.pt", "rng_rank00000.pt", "rng_rank00001.pt",
                           "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                           "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert all(listed[n]["size"] == (tag / n).stat().st_size for n in listed)
    assert "manifest_crc32c" in json.loads((tag / ckpt.MARKER).read_text())


def test_verify_accepts_run_checkpoint_and_tag_dirs(fallback, tmp_path):
    _, _, pristine = fallback
    tags = [pristine / "checkpoints" / ckpt.tag_for(s) for s in (2, 4)]
    for path in (pristine, pristine / "checkpoints", tags[1]):
        p = _zeroforge("verify", str(path))
        assert p.returncode == 0, p.stderr
        assert f"OK {tags[1]}" in p.stdout
    assert f"OK {tags[0]}" in _zeroforge("verify", str(pristine)).stdout  # every committed one
    broken = tmp_path / "run"
    shutil.copytree(pristine, broken)
    os.truncate(broken / "checkpoints" / ckpt.tag_for(2) / "rng_rank00001.pt", 5)
    p = _zeroforge("verify", str(broken))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"FAIL {broken / 'checkpoints' / ckpt.tag_for(2) / 'rng_rank00001.pt'}: truncated "
        f"(5 bytes, the manifest says "
        f"{(tags[0] / 'rng_rank00001.pt').stat().st_size})")


def test_corrupt_newest_checkpoint_falls_back_and_never_trains_on_it(fallback):
    first, again, _ = fallback
    assert again.returncode == 0, again.output[-4000:]
    assert "RESUME FALLBACK" in again.output and "resuming from" in again.output
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: checksum mismatch" in again.output
    ckpts = again.run_dir / "checkpoints"
    assert len(list(ckpts.glob("step_00000004.corrupt-*"))) == 1
    assert [s for s, _ in ckpt.committed(ckpts)] == [2, 4, 6]
    a, b = losses(first.metrics()), losses(again.metrics())
    assert list(b) == list(range(1, 7))
    assert [a[s] for s in (3, 4)] == [b[s] for s in (3, 4)], "steps 3-4 retrained from step 2"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{again.run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("zeroforge")
    (run,) = client.search_runs([exp.experiment_id])
    tag = run.data.tags["zeroforge.resume_fallback"]
    assert "step_00000004" in tag and "resumed from" in tag and "step_00000002" in tag


def test_every_checkpoint_corrupt_refuses_to_start_over(fallback, tiny_store, tmp_path):
    _, _, pristine = fallback
    run_dir = tmp_path / "run"
    shutil.copytree(pristine, run_dir)
    for _, tag in ckpt.committed(run_dir / "checkpoints"):
        os.truncate(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", 100)
    result = launch(run_dir, _overrides(tiny_store, run_dir, 6), nproc=1)
    assert result.returncode == EXIT_FAILED
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("zeroforge train: error: every committed checkpoint in")
    assert "mp_rank_00_model_states.pt: truncated (100 bytes" in last
    assert "refusing to start over" in last and "Traceback" not in result.output
    assert max(losses(result.metrics())) == 4, "nothing trained"


def test_zero3_shard_of_one_rank_cut_short_is_refused_by_every_rank(tiny_store, tmp_path):
    # Before the check ran ahead of DeepSpeed's load at ZeRO-3, rank 1 failed to read its shard
    # and met rank 0 (gathering the persistent parameters) in the check's gather: the ranks
    # were left in different collectives.
    run_dir = tmp_path / "run"

    def overrides(steps):
        return tiny_overrides(tiny_store, run_dir, **{
            "deepspeed.zero_optimization.stage": 3, "train.max_steps": steps,
            "checkpoint.every": 2})

    first = launch(run_dir, overrides(2))
    assert first.returncode == 0, first.output[-4000:]
    (shard,) = (run_dir / "checkpoints" / ckpt.tag_for(2)).glob("zero_pp_rank_1_*optim_states.pt")
    os.truncate(shard, shard.stat().st_size // 2)
    again = launch(run_dir, overrides(4))
    assert again.returncode == EXIT_FAILED, again.output[-4000:]
    refusals = [line for line in again.output.splitlines()
                if "error: every committed checkpoint in" in line]
    assert refusals and all(f"{shard}: truncated" in line for line in refusals), refusals
    assert len(list((run_dir / "checkpoints").glob("step_00000002.corrupt-*"))) == 1
    assert max(losses(again.metrics())) == 2, "nothing trained"
