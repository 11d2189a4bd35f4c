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

    Returns (mean token loss of the step over micro-batches and ranks, step skipped, stop
    requested). Every micro-batch all-reduces [non-finite flag, stop flag, loss] so all ranks
    agree on skipping and on preemption at the same boundary. A non-finite loss on any rank
    poisons the step: from then on every rank backpropagates NaN, so ZeRO's invalid-gradient-
    norm check discards the update everywhere (parameters and optimizer state unchanged);
    plain stage 0 drops the gradients itself (``skip_step_manually``).
    """
    engine, d = run.engine, run.dist
    step_no = run.state.step + 1
    poisoned = stop = False
    step_loss = 0.0
    accum = run.cfg.train.grad_accum
    # Loss normalisation (docs/training.md): every micro-batch contributes its summed token loss
    # divided by the loss-token count of the whole optimizer step, all micro-batches and all
    # ranks; so the step's gradient is that of the mean over every loss token of the step,
    # whatever the split into micro-batches. A micro-batch without loss tokens adds 0 (not
    # NaN) and does not weigh on the mean. The count comes from the CPU batches (drawn up
    # front) in one all-reduce; it stays on the device. DeepSpeed divides each backward loss by
    # grad_accum and averages gradients over ranks, hence the factor accum * world.
    micro_batches = [next(batches) for _ in range(accum)]
    count = torch.tensor(float(sum(run.task.loss_tokens(b) for b in micro_batches)),
                         dtype=torch.float64, device=run.device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    per_token = (1.0 / count.clamp(min=1.0)).float()  # a step with no loss token at all: 0
    for micro, batch in enumerate(micro_batches):
        loss_sum, _ = run.task.loss_sum(engine, batch, run.device)
        share = loss_sum * per_token  # this micro-batch's part of the step's mean loss
        loss = debug.poison_loss(share * (accum * d.world_size), step_no, d.rank, d.world_size)
        finite = bool(torch.isfinite(loss.detach()))
        flags = torch.tensor([0.0 if finite else 1.0, 1.0 if preempt.requested else 0.0,
                              float(share.detach()) if finite else 0.0],
                             dtype=torch.float64, device=run.device)
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        poisoned = poisoned or flags[0].item() > 0
        stop = stop or flags[1].item() > 0
        step_loss += flags[2].item()
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
    return (math.nan if poisoned else step_loss), skipped, stop
