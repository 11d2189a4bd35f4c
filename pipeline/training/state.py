"""What a run is while it trains: what setup built (``Run``) and what the loop carries from step
to step and a resume restores (``LoopState``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

from zeroforge.pipeline.config import RunConfig
from zeroforge.pipeline.data.loader import TrainLoader
from zeroforge.pipeline.dist import DistEnv
from zeroforge.pipeline.registry import Family, ModelConfig
from zeroforge.pipeline.tasks.base import Task
from zeroforge.pipeline.tracking.base import Tracker
from zeroforge.pipeline.tracking.metrics_file import MetricsWriter
from zeroforge.pipeline.tracking.progress import Progress
from zeroforge.pipeline.training.downstream import Downstream
from zeroforge.pipeline.training.startup import StartupClock


class Outcome(Enum):
    """What one optimizer step did (training/step.py decides, training/loop.py counts)."""

    APPLIED = "applied"
    NONFINITE = "nonfinite"  # a non-finite loss or gradient on some rank: skipped
    OVERFLOW = "overflow"  # fp16: the loss scaler found overflowing gradients, lowered the scale


@dataclass
class LoopState:
    """Everything the loop carries between steps that a resume must restore."""

    step: int = 0  # optimizer steps done (skipped ones included)
    samples: int = 0
    tokens: int = 0
    skipped_steps: int = 0  # steps without an update, of either kind below
    nonfinite_in_a_row: int = 0
    overflow_steps: int = 0  # fp16 loss-scale overflows (counted in skipped_steps too)
    overflows_in_a_row: int = 0
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LoopState:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


@dataclass
class Run:
    """What ``setup`` built; the loop reads it and advances ``state``."""

    cfg: RunConfig
    dist: DistEnv
    device: str
    run_dir: Path
    ckpt_dir: Path
    engine: Any  # deepspeed.DeepSpeedEngine
    model_config: ModelConfig
    family: Family
    task: Task
    ds_config: dict[str, Any]
    loader: TrainLoader
    val: list[dict]
    tracker: Tracker
    state: LoopState
    fingerprint: str
    n_params: int
    flops_per_step: float
    tokenizer: str
    metrics: MetricsWriter | None = None  # rank 0 only
    progress: Progress | None = None  # rank 0 only
    downstream: Downstream | None = None  # eval.harness_tasks (training/downstream.py)
    startup: StartupClock | None = None  # until the first step has been timed

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0
