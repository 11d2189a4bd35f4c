"""The DeepSpeed engine: device detection, building it, and the few engine operations the loop
needs (skip a step, finiteness of the parameters).

zeroforge reaches into DeepSpeed internals in two places: the manual skip of a non-finite step
at stage 0 (``skip_step_manually``) and the ZeRO-3 universal-load repair (training/elastic.py).
Both were written against, and are tested with, the versions in ``TESTED_DEEPSPEED``; on any
other version ``require_tested_deepspeed`` stops the run with a message instead of risking a
silently wrong update.
"""

from __future__ import annotations

import logging
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from zeroforge.pipeline.errors import RunError
from zeroforge.pipeline.lean_imports import without_muon
from zeroforge.pipeline.training.ds_config import Device
from zeroforge.pipeline.training.optim import OptimConfig, param_groups

log = logging.getLogger(__name__)

TESTED_DEEPSPEED = ("0.19.8",)


def require_tested_deepspeed(what: str) -> None:
    """Refuse to patch DeepSpeed internals (``what``) on a version they were not tested with."""
    if deepspeed.__version__ not in TESTED_DEEPSPEED:
        raise RunError(f"{what} relies on DeepSpeed internals tested with DeepSpeed "
                       f"{', '.join(TESTED_DEEPSPEED)}, but {deepspeed.__version__} is installed; "
                       f"install deepspeed=={TESTED_DEEPSPEED[-1]} (pyproject.toml pins it)")


def detect_device() -> Device:
    cpu = get_accelerator().device_name() == "cpu"
    bf16 = not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return Device(cpu=cpu, bf16=bf16)


def build_engine(model: torch.nn.Module, ds: dict[str, Any], optim: OptimConfig,
                 compile_model: bool = False) -> Any:
    """``deepspeed.initialize`` with weight-decay param groups; returns the engine."""
    groups = param_groups(model, optim.weight_decay)
    without_muon()  # ~2 s of start-up for an optimizer zeroforge never builds (lean_imports)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    if compile_model:
        engine.compile()
    return engine


# ----------------------------------------------------------------------------- step skipping


def deepspeed_skips_nonfinite(engine: Any) -> bool:
    """Whether DeepSpeed itself discards a step whose gradients are not finite.

    ZeRO 1-3 do (an invalid global grad norm counts as overflow in fp32/bf16 too), and so does
    fp16 loss scaling at every stage. Plain stage 0 in fp32/bf16 does not.
    """
    return engine.zero_optimization_stage() >= 1 or engine.fp16_enabled()


def skip_step_manually(engine: Any) -> None:
    """Finish an accumulation boundary without an update (stage 0 fp32/bf16 only).

    Drops the gradients and advances DeepSpeed's counters exactly as ``engine.step()`` does for
    a skipped step (``_take_model_step`` on overflow), so later boundaries and checkpoints see
    consistent ``global_steps`` / ``skipped_steps``.
    """
    require_tested_deepspeed("skipping a non-finite step at ZeRO stage 0")
    assert engine.is_gradient_accumulation_boundary(), "skip only at a boundary"
    engine.optimizer.zero_grad(set_to_none=True)
    engine.zero_grad()
    engine.micro_steps += 1
    engine.global_steps += 1
    engine.skipped_steps += 1
    engine.global_samples += engine.train_batch_size()


def local_params(engine: Any) -> list[torch.Tensor]:
    """The parameter values this rank holds (its partition at ZeRO-3)."""
    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        return [p.ds_tensor for p in params]
    return [p.data for p in params]


def local_params_finite(engine: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in local_params(engine))
