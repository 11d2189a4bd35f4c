"""``dist.timeout`` reaches the process group: a 2-rank run whose last rank hangs at step 3
(ZEROFORGE_DEBUG_HANG_AT_STEP: it waits for a message no rank sends, as a desynchronised rank
does, while rank 0 waits in the step's collective) ends within the timeout, with a non-zero exit,
its MLflow run FAILED, and no process left behind. Without the key the job would sit there for
DeepSpeed's default of 10 minutes."""

from __future__ import annotations

import time

import psutil
from mlflow.tracking import MlflowClient

from tests.e2e.conftest import finish, start, tiny_overrides, wait_for_step

TIMEOUT_S = 20
# After the timeout: the error on each rank, rank 0 marking its MLflow run, the launcher's
# poll (1 s) and exit. Measured here: ~5 s on a busy 2-core machine.
SLACK_S = 20


def test_hung_rank_ends_the_job_within_dist_timeout(tiny_store, tmp_path):
    overrides = tiny_overrides(tiny_store, tmp_path, **{
        "dist.timeout": TIMEOUT_S, "train.max_steps": 10, "checkpoint.every": 1000,
        "tracking.backend": "mlflow", "tracking.system_metrics": "false",
        "tracking.experiment": "e2e-timeout"})
    proc, log = start(tmp_path, overrides, env={"ZEROFORGE_DEBUG_HANG_AT_STEP": "3"})
    wait_for_step(tmp_path, proc, 2)
    hung_at = time.time()
    members = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    result = finish(proc, log, tmp_path)
    took = time.time() - hung_at
    assert result.returncode != 0, result.output[-4000:]
    assert "rank 1 hangs" in result.output
    assert (f"error: rank 0: a collective waited longer than dist.timeout ({TIMEOUT_S} s)"
            in result.output), result.output[-4000:]
    assert took < TIMEOUT_S + SLACK_S, f"the job ended {took:.0f}s after the hang"
    assert took > TIMEOUT_S - 5, "it ended before the timeout: something else failed"
    assert max(r["step"] for r in result.metrics()) == 2
    time.sleep(1)
    assert not [pid for pid in members if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE], "left behind"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("e2e-timeout").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
