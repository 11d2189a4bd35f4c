"""One optimizer step over ``train.grad_accum`` micro-batches, agreed on by every rank, with one
host-device sync.

The micro-batch loop only queues work on the device: each micro-batch adds its part of the
step's loss and a non-finite flag to a small device tensor of per-step sums (``StepSums``). At
the accumulation boundary that tensor, with this rank's preemption flag, is all-reduced and read
on the host once; from the result every rank decides the same thing at the same boundary: apply
the update, skip it, stop. (A per-micro-batch ``float(loss)`` or ``.item()`` would stall a GPU's
queue ``grad_accum`` times per step.)

Loss normalisation (docs/training.md): every micro-batch contributes its summed token loss
divided by the loss-token count of the whole optimizer step, all micro-batches and all ranks; so
the step's gradient is that of the mean over every loss token of the step, whatever the split
into micro-batches. That count is needed before the first backward, so it cannot be a slot of
the boundary sums; it needs no host-device sync either: the step's micro-batches are drawn up
front, their loss tokens are counted on the host from the CPU batch tensors, and the count goes
to the device without waiting (pinned memory on CUDA) and is all-reduced there (``step_weight``).
Nothing reads it back on the host. That all-reduce is the step's only other collective of ours.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from zeroforge.pipeline import debug
from zeroforge.pipeline.dist import PreemptionFlag
from zeroforge.pipeline.errors import RunError
from zeroforge.pipeline.tasks.base import Task, to_device
from zeroforge.pipeline.training.engine import deepspeed_skips_nonfinite, skip_step_manually
from zeroforge.pipeline.training.state import Outcome, Run


class TrainingError(RunError):
    """The run cannot continue (e.g. too many non-finite steps); the message names the step."""


@dataclass(frozen=True)
class StepResult:
    loss: float  # the step's mean token loss over micro-batches and ranks; nan when not finite
    outcome: Outcome
    stop: bool  # a preemption signal reached some rank before the boundary


class StepSums:
    """Per-step sums on the device, all-reduced and read on the host once, at the boundary."""

    SLOTS = ("nonfinite", "loss", "stop")

    def __init__(self, device: str) -> None:
        self.values = torch.zeros(len(self.SLOTS), dtype=torch.float64, device=device)

    def add_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Count one micro-batch's loss; returns the loss to backpropagate: NaN when it is not
        finite, so this rank's gradients are NaN (an infinite loss can have finite gradients)."""
        loss_d = loss.detach()
        finite = torch.isfinite(loss_d)
        self.values[:2] += torch.stack([(~finite).double(),
                                        torch.where(finite, loss_d.double(), 0.0)])
        return loss * torch.where(finite, 1.0, math.nan).to(loss.dtype)

    def agree(self, stop: bool) -> dict[str, float]:
        """Sum over ranks and read on the host (collective: every rank, once per step)."""
        if stop:
            self.values[self.SLOTS.index("stop")] = 1.0
        dist.all_reduce(self.values, op=dist.ReduceOp.SUM)
        return dict(zip(self.SLOTS, self.values.tolist(), strict=True))


def step_weight(task: Task, micro_batches: Sequence[dict], device: str) -> torch.Tensor:
    """1 / the loss-token count of the whole step (all micro-batches, all ranks), a float32
    scalar on ``device``; 0 for a step without any loss token (its loss sums to 0, not NaN).

    The count is taken on the host from the CPU batches, copied without waiting (page-locked
    on CUDA, as the loader's batches) and all-reduced on the device (collective: every rank)."""
    count = torch.tensor(float(sum(task.loss_tokens(b) for b in micro_batches)),
                         dtype=torch.float64)
    if torch.device(device).type == "cuda":
        count = count.pin_memory()
    count = to_device(count, device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return (1.0 / count.clamp(min=1.0)).float()


def train_step(run: Run, batches: Iterator[dict], preempt: PreemptionFlag) -> StepResult:
    """One optimizer step over ``grad_accum`` micro-batches.

    A non-finite loss on any rank skips the step everywhere: its NaN gradients reach every rank
    through the gradient all-reduce, so ZeRO 1-3 and fp16's loss scaler discard the update
    (parameters and optimizer state unchanged); plain stage 0 in fp32/bf16, which would apply
    it, is skipped by hand (``skip_step_manually``) on the agreed flag.
    """
    engine, accum = run.engine, run.cfg.train.grad_accum
    step_no, d = run.state.step + 1, run.dist
    micro_batches = [next(batches) for _ in range(accum)]
    per_token = step_weight(run.task, micro_batches, run.device)
    # DeepSpeed divides each backward loss by grad_accum and averages gradients over ranks.
    scale = accum * d.world_size
    sums = StepSums(run.device)
    for micro, batch in enumerate(micro_batches):
        loss_sum, _ = run.task.loss_sum(engine, batch, run.device)
        share = loss_sum * per_token  # this micro-batch's part of the step's mean loss
        share = debug.poison_loss(share, step_no, d.rank, d.world_size)
        engine.backward(sums.add_loss(share) * scale)
        if micro < accum - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
    debug.hang_before_boundary(step_no, d.rank, d.world_size)
    agreed = sums.agree(preempt.requested)
    nonfinite, stop = agreed["nonfinite"] > 0, agreed["stop"] > 0
    if nonfinite and not deepspeed_skips_nonfinite(engine):
        skip_step_manually(engine)
    else:
        engine.step()
        if nonfinite and engine.was_step_applied():
            raise TrainingError(f"step {step_no}: DeepSpeed applied an update with non-finite "
                                "gradients (this configuration cannot skip steps)")
    loss = math.nan if nonfinite else agreed["loss"]  # the shares add up to the mean
    applied = not nonfinite and engine.was_step_applied()
    return StepResult(loss, classify(nonfinite, applied, engine.fp16_enabled()), stop)


def classify(nonfinite_loss: bool, applied: bool, fp16: bool) -> Outcome:
    """What a step did, from the agreed loss flag and what DeepSpeed reports."""
    if nonfinite_loss:
        return Outcome.NONFINITE
    if applied:
        return Outcome.APPLIED
    # Finite losses everywhere, yet no update: with fp16 the loss scaler saw overflowing
    # gradients (it lowers the scale and tries again); otherwise the gradients themselves were
    # not finite.
    return Outcome.OVERFLOW if fp16 else Outcome.NONFINITE
