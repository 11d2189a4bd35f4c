"""``eval``: downstream evaluation during training through lm-evaluation-harness (YAML key
``eval``); the evaluation itself is in results/harness.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import ClassVar

from pydantic import Field
from zeroforge.pipeline.section import Section

INSTALL_HINT = "pip install 'zeroforge[eval]'"


class EvalConfig(Section):
    KEY: ClassVar[str] = "eval"

    harness_tasks: list[str] = Field(default_factory=list)  # harness task names; []: off
    harness_every: int = 0  # every N optimizer steps, and at the end; 0: only at the end
    harness_num_fewshot: int | None = None  # None: each task's own default
    harness_limit: int | None = None  # at most N documents per task; None: all
    harness_batch_size: int = 16  # requests per forward pass, on each rank
    harness_include_path: str | None = None  # a folder of task YAML files (local tasks)

    def problems(self) -> list[str]:
        p = []
        if any(not isinstance(t, str) or not t.strip() or "," in t for t in self.harness_tasks):
            p.append("eval.harness_tasks must be a list of task names (one per entry)")
        if self.harness_every < 0:
            p.append(f"eval.harness_every must be >= 0, got {self.harness_every}")
        if self.harness_num_fewshot is not None and self.harness_num_fewshot < 0:
            p.append(f"eval.harness_num_fewshot must be >= 0, got {self.harness_num_fewshot}")
        if self.harness_limit is not None and self.harness_limit < 1:
            p.append(f"eval.harness_limit must be at least 1 or null, got {self.harness_limit}")
        if self.harness_batch_size < 1:
            p.append(f"eval.harness_batch_size must be at least 1, got {self.harness_batch_size}")
        if self.harness_include_path is not None and not Path(self.harness_include_path).is_dir():
            p.append(f"eval.harness_include_path: no such directory {self.harness_include_path!r}")
        if self.harness_tasks and importlib.util.find_spec("lm_eval") is None:
            p.append(f"eval.harness_tasks needs lm-evaluation-harness: {INSTALL_HINT}")
        return p

    def due(self, step: int, at_end: bool) -> bool:
        """Whether the harness runs after optimizer step ``step``."""
        every = self.harness_every
        return bool(self.harness_tasks) and (at_end or (every > 0 and step % every == 0))
