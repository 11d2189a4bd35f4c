"""The training sections of a run config: ``train`` (the step loop), ``checkpoint`` and
``dist`` (the process group)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from zeroforge.pipeline.section import Section

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class TrainConfig(Section):
    KEY: ClassVar[str] = "train"

    max_steps: int = 1000  # optimizer steps (skipped non-finite steps count too)
    seed: int = 1234  # model init, data order, dropout
    micro_batch_size: int = 8  # sequences per rank per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: str = "auto"  # auto (bf16 on a bf16-capable GPU, else fp32) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the model (DeepSpeed's engine.compile(): inductor)
    # Deterministic kernels (torch.use_deterministic_algorithms): the same run gives the same
    # bits, so a resume is exact. None: on when compiling on CPU (eager CPU kernels are
    # deterministic already); off on GPU, where they cost speed.
    deterministic: bool | None = None
    log_every: int = 1  # metrics.jsonl / tracker / progress line every N steps
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batch_size: int | None = None  # None: micro_batch_size
    early_stopping_patience: int = 0  # stop after N evals without improvement; 0: off
    early_stopping_min_delta: float = 0.0  # improvement smaller than this does not count
    max_nonfinite_in_a_row: int = 3  # more consecutive skipped (non-finite) steps: stop
    # fp16 only: more consecutive loss-scale overflows: stop. From the shipped initial scale
    # 2^16, 17 overflows in a row reach fp16.min_loss_scale 1 (DeepSpeed stops there itself).
    max_overflows_in_a_row: int = 32
    sample_prompts: list[str] = Field(default_factory=lambda: ["The", "Once upon a time"])
    sample_tokens: int = 32  # greedy + top-k continuations logged at each eval; 0: off

    def problems(self) -> list[str]:
        p = []
        for name in ("max_steps", "micro_batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                p.append(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "early_stopping_patience", "max_nonfinite_in_a_row",
                     "max_overflows_in_a_row", "sample_tokens"):
            if getattr(self, name) < 0:
                p.append(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            p.append(f"train.eval_batch_size must be at least 1, got {self.eval_batch_size}")
        if self.precision not in PRECISIONS:
            p.append(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.early_stopping_patience and not self.eval_every:
            p.append("train.early_stopping_patience needs train.eval_every > 0")
        return p

    @property
    def eval_micro_batch(self) -> int:
        return self.eval_batch_size or self.micro_batch_size


class CheckpointConfig(Section):
    """When and where to checkpoint (YAML key ``checkpoint``)."""

    KEY: ClassVar[str] = "checkpoint"

    every: int = 1000  # save every N optimizer steps (and always at the end); 0: only the end
    keep_last: int = 3  # committed checkpoints kept; older ones are deleted
    dir: str | None = None  # None: <run_dir>/checkpoints

    def problems(self) -> list[str]:
        p = []
        if self.every < 0:
            p.append(f"checkpoint.every must be >= 0, got {self.every}")
        if self.keep_last < 1:
            p.append(f"checkpoint.keep_last must be at least 1, got {self.keep_last}")
        return p

    def path(self, run_dir: str | Path) -> Path:
        return Path(self.dir) if self.dir else Path(run_dir) / "checkpoints"


class DistConfig(Section):
    """The process group (YAML key ``dist``)."""

    KEY: ClassVar[str] = "dist"

    # Seconds a collective waits for the other ranks before the run fails, so a hung or dead
    # rank ends the job instead of holding every GPU. None: DeepSpeed's default (10 minutes,
    # or $DEEPSPEED_TIMEOUT minutes). Give slow one-off steps room: a checkpoint save or the
    # elastic conversion on rank 0 runs while the other ranks wait at a barrier.
    timeout: float | None = None

    def problems(self) -> list[str]:
        if self.timeout is not None and not self.timeout > 0:
            return [f"dist.timeout must be a number of seconds > 0 (or null), got {self.timeout}"]
        return []
