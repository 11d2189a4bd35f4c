"""``train(cfg)``: one rank's whole run (process group, setup, the loop), any launcher.

Every launcher starts the same command on every rank (``python -m zeroforge.launch train
...``); the rank, world size and master address come from the launcher's environment
(pipeline/dist.py).
"""

from __future__ import annotations

import logging

from zeroforge.pipeline.config import RunConfig
from zeroforge.pipeline.dist import PreemptionFlag, discover
from zeroforge.pipeline.errors import EXIT_OK, ConfigError, ZeroforgeError
from zeroforge.pipeline.tracking.tracker import tracking_status
from zeroforge.pipeline.training.loop import fit
from zeroforge.pipeline.training.process import init_distributed
from zeroforge.pipeline.training.setup import setup

log = logging.getLogger("zeroforge.train")


def _quiet_other_ranks(rank: int) -> None:
    if rank != 0:
        # Rank-0-only logs: other ranks speak up for warnings and errors.
        logging.getLogger().setLevel(logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train(cfg: RunConfig) -> int:
    """Run this process's rank (call once per rank); returns the exit code."""
    d = discover()
    _quiet_other_ranks(d.rank)
    preempt = PreemptionFlag(announce=d.rank == 0).install()
    device = init_distributed(d)
    try:
        run = setup(cfg, d, device)
    except ZeroforgeError:
        raise
    except ValueError as e:  # a bad store, model field or weights file: the input is wrong
        raise ConfigError(str(e)) from None
    try:
        with tracking_status(run.tracker):
            code = fit(run, preempt)
    finally:
        run.loader.close()
        if run.is_main:
            run.metrics.close()
            run.progress.close()
    if run.is_main and code == EXIT_OK:
        log.info("done: %d steps, %d skipped; run dir %s", run.state.step,
                 run.state.skipped_steps, run.run_dir)
    return code
