"""Ctrl-C (SIGINT) during `zeroforge train`, as a terminal sends it: to the foreground process
group. The first one is a preemption (every rank stops at the same step boundary, commits a
checkpoint, exit 75); a second one aborts at once (exit 130, no checkpoint). Either way: one
line, no traceback, and with `--nproc 2` no launcher or rank outlives the command."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from zeroforge.pipeline.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED
from zeroforge.pipeline.tracking.metrics_file import read_metrics
from zeroforge.pipeline.training.checkpoint import committed

from tests.e2e.conftest import PYTHON, REPO, TINY_CONFIG, tiny_overrides

ANNOUNCEMENT = "Ctrl-C: stopping at the next step boundary with a checkpoint"


def _start(run_dir: Path, store: Path, nproc: int) -> tuple[subprocess.Popen, Path]:
    # Bigger batches than the other e2e runs: a step takes long enough for two Ctrl-C's to land
    # inside one step.
    overrides = tiny_overrides(store, run_dir, **{
        "train.max_steps": 500, "checkpoint.every": 1000, "train.micro_batch_size": 16,
        "data.seq_len": 64})
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([PYTHON, "-m", "zeroforge.launch", "train", "--config",
                                 TINY_CONFIG, "--nproc", str(nproc), *overrides], cwd=REPO,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    while not any(r["step"] >= 2 for r in read_metrics(run_dir)):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.1)
    return proc, log


def _ctrl_c(proc: subprocess.Popen, log: Path, times: int) -> list[psutil.Process]:
    """Press Ctrl-C ``times`` times; a second press comes once rank 0 has taken the first
    (its announcement is in the log), so that the two are not one signal to it. Returns the
    processes under the command as they were before."""
    family = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the foreground process group
    if times == 2:
        deadline = time.time() + 60
        while ANNOUNCEMENT not in log.read_text():
            assert time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=240)
    return family


def _left_over(family: list[psutil.Process]) -> list[int]:
    time.sleep(1.0)
    return [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("nproc", [1, 2])
def test_first_ctrl_c_checkpoints_and_exits_75(tiny_store, tmp_path, nproc):
    run_dir = tmp_path / "run"
    proc, log = _start(run_dir, tiny_store, nproc)
    family = _ctrl_c(proc, log, 1)
    out = log.read_text()
    assert proc.returncode == EXIT_PREEMPTED, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert ANNOUNCEMENT in out
    last = max(r["step"] for r in read_metrics(run_dir) if "train/loss" in r)
    assert [s for s, _ in committed(run_dir / "checkpoints")] == [last]
    assert _left_over(family) == []


def test_second_ctrl_c_aborts_at_once(tiny_store, tmp_path):
    run_dir = tmp_path / "run"
    proc, log = _start(run_dir, tiny_store, 2)
    family = _ctrl_c(proc, log, 2)
    out = log.read_text()
    assert proc.returncode == EXIT_INTERRUPTED, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert out.strip().splitlines()[-1] == (
        "zeroforge train: interrupted: stopped without a checkpoint; rerun the same command to "
        "resume from the newest committed one")
    assert committed(run_dir / "checkpoints") == []
    assert _left_over(family) == []
