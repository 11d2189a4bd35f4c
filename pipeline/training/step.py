"""One optimizer step over ``train.grad_accum`` micro-batches, agreed on by every rank."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from zeroforge.pipeline import debug
from zeroforge.pipeline.dist import PreemptionFlag
from zeroforge.pipeline.errors import RunError
from zeroforge.pipeline.training.engine import deepspeed_skips_nonfinite, skip_step_manually
from zeroforge.pipeline.training.state import Run


class TrainingError(RunError):
    """The run cannot continue (e.g. too many non-finite steps); the message names the step."""


def train_step(run: Run, batches: Iterator[dict], preempt: PreemptionFlag
               ) -> tuple[float, bool, bool]:
    """One optimizer step over ``grad_accum`` micro-batches.

    Returns (mean loss over micro-batches and ranks, step skipped, stop requested). Every
    micro-batch all-reduces [non-finite flag, stop flag, loss] so all ranks agree on skipping
    and on preemption at the same boundary. A non-finite loss on any rank poisons the step:
    from then on every rank backpropagates NaN, so ZeRO's invalid-gradient-norm check discards
    the update everywhere (parameters and optimizer state unchanged); plain stage 0 drops the
    gradients itself (``skip_step_manually``).
    """
    engine, d = run.engine, run.dist
    step_no = run.state.step + 1
    poisoned = stop = False
    loss_sum = 0.0
    accum = run.cfg.train.grad_accum
    for micro in range(accum):
        batch = next(batches)
        loss = run.task.loss(engine, batch, run.device)
        loss = debug.poison_loss(loss, step_no, d.rank, d.world_size)
        finite = bool(torch.isfinite(loss.detach()))
        flags = torch.tensor([0.0 if finite else 1.0, 1.0 if preempt.requested else 0.0,
                              float(loss.detach()) if finite else 0.0],
                             dtype=torch.float64, device=run.device)
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        poisoned = poisoned or flags[0].item() > 0
        stop = stop or flags[1].item() > 0
        loss_sum += flags[2].item() / d.world_size
        if poisoned:
            loss = loss * float("nan")
        engine.backward(loss)
        if poisoned and micro == accum - 1 and not deepspeed_skips_nonfinite(engine):
            skip_step_manually(engine)
        else:
            engine.step()
    if poisoned and engine.was_step_applied():
        raise TrainingError(f"step {step_no}: DeepSpeed applied an update with non-finite "
                            "gradients (this configuration cannot skip steps)")
    skipped = poisoned or not engine.was_step_applied()  # fp16 loss-scale overflow too
    return (math.nan if poisoned else loss_sum / accum), skipped, stop
