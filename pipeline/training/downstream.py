"""lm-evaluation-harness tasks during training (``eval.harness_tasks``, ``eval.harness_every``).

All ranks share the work: each takes every world-th document of each task (the harness's own
data-parallel split, results/harness.py) and runs it on a full copy of the model it holds
(ZeRO 0-2: the engine's module; ZeRO-3: a copy gathered one parameter at a time for the
duration of the evaluation, since a ZeRO-3 forward pass is a collective that ranks with
different documents cannot run together). Rank 0 gathers the per-document scores and returns
the ``harness/<task>/<metric>`` numbers; the loop logs them to metrics.jsonl and the MLflow run.
The harness seeds python, numpy and torch; the training RNG state is put back afterwards.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import deepspeed
import torch
from zeroforge.data_prep.tokenize import get_encoding
from zeroforge.pipeline.registry import Family, ModelConfig
from zeroforge.pipeline.results.eval_config import EvalConfig
from zeroforge.pipeline.training.process import rng_state, set_rng_state

log = logging.getLogger("zeroforge.train")


class Downstream:
    """The configured harness tasks of a run, indexed and checked once at setup."""

    def __init__(self, cfg: EvalConfig, family: Family, model_config: ModelConfig,
                 tokenizer: str, rank: int) -> None:
        # Imported only when tasks are configured: lm-evaluation-harness is the optional `eval`
        # extra, and importing it costs ~1.5 s.
        from zeroforge.pipeline.results import harness

        self.cfg, self.family, self.model_config = cfg, family, model_config
        self.harness, self.rank = harness, rank
        self.encoding = get_encoding(tokenizer)
        t0 = time.time()
        self.manager = harness.task_manager(cfg.harness_include_path)
        # Before the first step: a task that cannot be loaded fails the run now, not hours in.
        harness.check_tasks(cfg.harness_tasks, self.manager, "eval.harness_tasks")
        if rank == 0:
            log.info("eval.harness_tasks: %s ready in %.1fs", ", ".join(cfg.harness_tasks),
                     time.time() - t0)

    def due(self, step: int, at_end: bool) -> bool:
        return self.cfg.due(step, at_end)

    def evaluate(self, engine: Any) -> dict[str, float]:
        """Run the tasks (call on every rank); the metrics on rank 0, {} elsewhere."""
        module = _full_module(engine, self.family, self.model_config)
        was_training = module.training
        module.eval()
        saved = rng_state()
        t0 = time.time()
        try:
            lm = self.harness.ZeroforgeLM(module, self.family, self.encoding,
                                          self.cfg.harness_batch_size, distributed=True)
            results = self.harness.evaluate(lm, self.cfg.harness_tasks, self.manager,
                                            self.cfg.harness_num_fewshot, self.cfg.harness_limit)
        finally:
            set_rng_state(saved)
            module.train(was_training)
        if results is None:
            return {}
        out = self.harness.metrics(results)
        log.info("harness: %s in %.1fs", ", ".join(f"{k} {v:.4g}" for k, v in out.items()
                                                   if "_stderr" not in k), time.time() - t0)
        return out


def _full_module(engine: Any, family: Family, model_config: ModelConfig) -> torch.nn.Module:
    """A module with every parameter on this rank: the engine's own below ZeRO-3."""
    if engine.zero_optimization_stage() != 3:
        return engine.module
    first = next(engine.module.parameters())
    copy = family.build(model_config).to(device=first.device, dtype=first.dtype)
    mine = dict(copy.named_parameters())
    # Same order on every rank: each gather is a collective.
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]), torch.no_grad():
            mine[name].copy_(p.data)
    return copy


def make_downstream(cfg: EvalConfig, family: Family, model_config: ModelConfig, tokenizer: str,
                    rank: int) -> Downstream | None:
    return Downstream(cfg, family, model_config, tokenizer, rank) if cfg.harness_tasks else None
