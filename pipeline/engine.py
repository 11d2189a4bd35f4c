"""The DeepSpeed side: merge ds_config.json with the run config, build the engine, and the few
engine operations the loop needs (skip a step, checksum / finiteness of the parameters).

ds_config.json holds DeepSpeed-only settings (ZeRO stage, offload, buckets, fp16 loss scaling).
The values that belong to the run are ``"auto"`` there and filled here, so each lives in one
place:

    train_micro_batch_size_per_gpu   train.micro_batch_size
    gradient_accumulation_steps      train.grad_accum
    train_batch_size                 micro * accum * world size
    gradient_clipping                optim.grad_clip
    optimizer                        AdamW from optim.* (torch AdamW on CPU without offload,
                                     DeepSpeedCPUAdam with offload, FusedAdam on GPU)
    scheduler                        removed: zeroforge sets the lr every step (pipeline/optim.py)
    bf16.enabled / fp16.enabled      train.precision

Setting one of these to a concrete value in the DeepSpeed file (or a ``deepspeed.*`` override)
is an error naming the run-config key to change instead.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.config import RunConfig
from pipeline.optim import OptimConfig, param_groups

log = logging.getLogger(__name__)

AUTO = "auto"
# DeepSpeed key path -> the run-config key that owns its value.
RUN_OWNED: dict[tuple[str, ...], str] = {
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): "train.grad_accum",
    ("train_batch_size",): "train.micro_batch_size * train.grad_accum * world size",
    ("gradient_clipping",): "optim.grad_clip",
    ("optimizer",): "optim.*",
    ("scheduler",): "optim.schedule / optim.warmup_steps",
    ("bf16", "enabled"): "train.precision",
    ("fp16", "enabled"): "train.precision",
}


def load_ds_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"deepspeed_config: no such file {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _get(d: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _set(d: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def _flatten(d: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flatten(v, prefix + (k,))
        else:
            out.append((prefix + (k,), v))
    return out


def resolve_precision(precision: str) -> str:
    if precision != AUTO:
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def merge_ds_config(cfg: RunConfig, world_size: int, cpu: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed config this run uses: file + ``deepspeed.*`` overrides + run values."""
    path = cfg.resolve_ds_config_path()
    ds = load_ds_file(path)
    problems: list[str] = []
    for key, value in _flatten(ds):
        owner = next((RUN_OWNED[p] for p in RUN_OWNED if key[: len(p)] == p), None)
        if owner and value != AUTO:
            problems.append(f"{path}: {'.'.join(key)} must be \"auto\" (it comes from {owner})")
    for key, value in _flatten(cfg.deepspeed):
        name = "deepspeed." + ".".join(key)
        if key[0] not in ds:
            problems.append(f"{name}: unknown key; {path} has top-level keys "
                            f"{', '.join(sorted(ds))} (add new sections in your own "
                            "deepspeed_config file)")
            continue
        owner = next((RUN_OWNED[p] for p in RUN_OWNED if key[: len(p)] == p), None)
        if owner:
            problems.append(f"{name}: set {owner} in the run config instead")
            continue
        _set(ds, key, copy.deepcopy(value))
    if problems:
        raise ValueError("invalid DeepSpeed config:\n  " + "\n  ".join(problems))

    train, optim = cfg.train, cfg.optim
    cpu = on_cpu() if cpu is None else cpu
    ds["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    ds["gradient_accumulation_steps"] = train.grad_accum
    ds["train_batch_size"] = train.micro_batch_size * train.grad_accum * world_size
    ds["gradient_clipping"] = optim.grad_clip
    offload = _get(ds, ("zero_optimization", "offload_optimizer", "device")) not in (None, "none")
    ds["optimizer"] = _optimizer_section(optim, torch_adam=cpu and not offload)
    ds.pop("scheduler", None)
    precision = resolve_precision(train.precision)
    ds.setdefault("bf16", {})["enabled"] = precision == "bf16"
    ds.setdefault("fp16", {})["enabled"] = precision == "fp16"
    stage = _get(ds, ("zero_optimization", "stage")) or 0
    if precision == "fp16" and cpu:
        raise ValueError("train.precision=fp16 is not supported on CPU; use fp32 or bf16")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_optimization.stage must be 0-3, got {stage!r}")
    return ds


def _optimizer_section(optim: OptimConfig, torch_adam: bool) -> dict[str, Any]:
    params: dict[str, Any] = {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                              "weight_decay": optim.weight_decay}
    if torch_adam:
        # DeepSpeed's FusedAdam needs a GPU; on CPU without offload use torch's AdamW.
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def zero_stage(ds: dict[str, Any]) -> int:
    return int(_get(ds, ("zero_optimization", "stage")) or 0)


def build_engine(model: torch.nn.Module, ds: dict[str, Any], optim: OptimConfig,
                 compile_model: bool = False) -> Any:
    """``deepspeed.initialize`` with weight-decay param groups; returns the engine."""
    import deepspeed

    groups = param_groups(model, optim.weight_decay)
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
    assert engine.is_gradient_accumulation_boundary(), "skip only at a boundary"
    engine.optimizer.zero_grad(set_to_none=True)
    engine.zero_grad()
    engine.micro_steps += 1
    engine.global_steps += 1
    engine.skipped_steps += 1
    engine.global_samples += engine.train_batch_size()


def _local_tensors(engine: Any) -> list[torch.Tensor]:
    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        return [p.ds_tensor for p in params]  # this rank's partition
    return [p.data for p in params]


def local_params_finite(engine: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _local_tensors(engine))


def param_checksum(engine: Any) -> float:
    """Sum of all parameters in float64 (gathers ZeRO-3 partitions: call on every rank)."""
    import deepspeed

    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params):
            return float(sum(p.detach().double().sum() for p in params))
    return float(sum(p.detach().double().sum() for p in params))
