"""Fault injection and introspection for tests and outside checks: inert unless set.

The variables are a contract (docs/training.md); keep their names and meanings.

    ZEROFORGE_DEBUG_NAN_STEPS=3,4        the loss of these steps is NaN on the last rank
    ZEROFORGE_DEBUG_KILL_AFTER_STEP=13   rank 0 SIGKILLs its process group after step 13 is
                                         logged (and checkpointed if due)
    ZEROFORGE_DEBUG_KILL_IN_SAVE=8       rank 0 SIGKILLs its process group after checkpoint 8's
                                         shards are written, before the commit
    ZEROFORGE_DEBUG_HANG_AT_STEP=5       the last rank hangs before step 5's boundary
                                         collective, waiting for a message that never comes
    ZEROFORGE_DEBUG_CHECKSUM=1           metrics.jsonl gets every rank's parameter checksum
    ZEROFORGE_DEBUG_SAMPLE_IDS=1         metrics.jsonl gets the sample ids consumed since the
                                         previous line (all ranks)

The environment is read at each call (a few dictionary lookups per step), so a test may set it
in-process. The kills hit the whole process group: start the run in its own session.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

log = logging.getLogger("zeroforge.debug")

NAN_STEPS = "ZEROFORGE_DEBUG_NAN_STEPS"
KILL_AFTER_STEP = "ZEROFORGE_DEBUG_KILL_AFTER_STEP"
KILL_IN_SAVE = "ZEROFORGE_DEBUG_KILL_IN_SAVE"
HANG_AT_STEP = "ZEROFORGE_DEBUG_HANG_AT_STEP"
CHECKSUM = "ZEROFORGE_DEBUG_CHECKSUM"
SAMPLE_IDS = "ZEROFORGE_DEBUG_SAMPLE_IDS"


def _steps(var: str) -> set[int]:
    return {int(x) for x in os.environ.get(var, "").split(",") if x.strip()}


def _kill_group(var: str, step: int) -> None:
    log.warning("debug: %s=%d, killing the process group", var, step)
    os.killpg(os.getpgid(0), signal.SIGKILL)


def poison_loss(loss: torch.Tensor, step: int, rank: int, world_size: int) -> torch.Tensor:
    """``loss`` times NaN on the last rank at the steps in ZEROFORGE_DEBUG_NAN_STEPS."""
    if rank == world_size - 1 and step in _steps(NAN_STEPS):
        return loss * float("nan")
    return loss


def kill_after_step(step: int, rank: int) -> None:
    if rank == 0 and step in _steps(KILL_AFTER_STEP):
        _kill_group(KILL_AFTER_STEP, step)


def kill_in_save(step: int, rank: int) -> None:
    if rank == 0 and step in _steps(KILL_IN_SAVE):
        _kill_group(KILL_IN_SAVE, step)


def hang_before_boundary(step: int, rank: int, world_size: int) -> None:
    """The last rank hangs as a desynchronised rank does: it waits for a message from rank 0
    that never comes, while the other ranks wait in the step's collective. Only
    ``dist.timeout`` ends either wait."""
    if rank == world_size - 1 and step in _steps(HANG_AT_STEP):
        log.warning("debug: %s=%d, rank %d hangs", HANG_AT_STEP, step, rank)
        if world_size > 1:
            dist.recv(torch.zeros(1), src=0)
        while True:  # a lone rank has no one to wait for
            time.sleep(3600)


class SampleIdRecorder:
    """Wraps the loop's batch iterator and remembers the ``sample_ids`` it handed out."""

    def __init__(self, batches: Iterator[dict]) -> None:
        self._batches = batches
        self._ids: list[int] = []

    def __iter__(self) -> SampleIdRecorder:
        return self

    def __next__(self) -> dict:
        batch = next(self._batches)
        self._ids += [int(i) for i in batch["sample_ids"]]
        return batch

    def gather(self, world_size: int) -> list[int]:
        """Sorted union over all ranks of the ids consumed since the previous call
        (collective: call on every rank)."""
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, self._ids)
        self._ids = []
        return sorted(i for part in parts for i in part)


def record_batches(batches: Iterator[dict]) -> Iterator[dict]:
    """``batches``, recording sample ids when ZEROFORGE_DEBUG_SAMPLE_IDS=1."""
    return SampleIdRecorder(batches) if os.environ.get(SAMPLE_IDS) == "1" else batches


def param_checksum(engine: Any) -> float:
    """Sum of all parameters in float64 (gathers ZeRO-3 partitions: call on every rank)."""
    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params):
            return float(sum(p.detach().double().sum() for p in params))
    return float(sum(p.detach().double().sum() for p in params))


def step_metrics(engine: Any, batches: Iterator[dict], world_size: int, device: str
                 ) -> dict[str, Any]:
    """The debug/* entries of a metrics line (collective when any is enabled: every rank)."""
    out: dict[str, Any] = {}
    if os.environ.get(CHECKSUM) == "1":
        mine = torch.tensor([param_checksum(engine)], dtype=torch.float64, device=device)
        sums = [torch.zeros_like(mine) for _ in range(world_size)]
        dist.all_gather(sums, mine)
        out |= {f"debug/param_checksum_rank{r}": float(t.item()) for r, t in enumerate(sums)}
    if isinstance(batches, SampleIdRecorder):
        out["debug/sample_ids"] = batches.gather(world_size)
    return out
