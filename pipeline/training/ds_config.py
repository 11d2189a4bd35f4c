"""The DeepSpeed config a run uses: ds_config.json + ``deepspeed.*`` overrides + run values.

ds_config.json holds DeepSpeed-only settings (ZeRO stage, offload, buckets, fp16 loss scaling).
The values that belong to the run are ``"auto"`` there and filled here, so each lives in one
place:

    train_micro_batch_size_per_gpu   train.micro_batch_size
    gradient_accumulation_steps      train.grad_accum
    train_batch_size                 micro * accum * world size
    gradient_clipping                optim.grad_clip
    optimizer                        AdamW from optim.*: torch's AdamW (fused on GPU: one
                                     kernel over all parameters), DeepSpeedCPUAdam with
                                     optimizer offload
    scheduler                        removed: zeroforge sets the lr every step (training/optim.py)
    bf16.enabled / fp16.enabled      train.precision

Setting one of these to a concrete value in the DeepSpeed file (or a ``deepspeed.*`` override)
is an error naming the run-config key to change instead. Pure JSON work: no torch import.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.training.config import TrainConfig
from zeroforge.pipeline.training.optim import OptimConfig

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


@dataclass(frozen=True)
class Device:
    """What the merge needs to know about the hardware (training/engine.py detects it)."""

    cpu: bool  # DeepSpeed's CPU accelerator: torch AdamW, no fp16
    bf16: bool = False  # "auto" precision picks bf16


def load_ds_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed_config: no such file {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
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


def _owner(key: tuple[str, ...]) -> str | None:
    return next((RUN_OWNED[p] for p in RUN_OWNED if key[: len(p)] == p), None)


def resolve_precision(precision: str, device: Device) -> str:
    if precision != AUTO:
        return precision
    return "bf16" if device.bf16 else "fp32"


def merge_ds_config(path: Path, overrides: dict[str, Any], train: TrainConfig, optim: OptimConfig,
                    world_size: int, device: Device) -> dict[str, Any]:
    """The DeepSpeed config of a run: the file at ``path``, the ``deepspeed.*`` overrides, and
    the run-owned values; raises ConfigError listing every problem."""
    ds = load_ds_file(path)
    problems: list[str] = []
    for key, value in _flatten(ds):
        owner = _owner(key)
        if owner and value != AUTO:
            problems.append(f"{path}: {'.'.join(key)} must be \"auto\" (it comes from {owner})")
    for key, value in _flatten(overrides):
        name = "deepspeed." + ".".join(key)
        if key[0] not in ds:
            problems.append(f"{name}: unknown key; {path} has top-level keys "
                            f"{', '.join(sorted(ds))} (add new sections in your own "
                            "deepspeed_config file)")
            continue
        owner = _owner(key)
        if owner:
            problems.append(f"{name}: set {owner} in the run config instead")
            continue
        _set(ds, key, copy.deepcopy(value))
    if problems:
        raise ConfigError("invalid DeepSpeed config:\n  " + "\n  ".join(problems))

    ds["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    ds["gradient_accumulation_steps"] = train.grad_accum
    ds["train_batch_size"] = train.micro_batch_size * train.grad_accum * world_size
    ds["gradient_clipping"] = optim.grad_clip
    offload = _get(ds, ("zero_optimization", "offload_optimizer", "device")) not in (None, "none")
    ds["optimizer"] = _optimizer_section(optim, offload=offload, gpu=not device.cpu)
    ds.pop("scheduler", None)
    precision = resolve_precision(train.precision, device)
    ds.setdefault("bf16", {})["enabled"] = precision == "bf16"
    ds.setdefault("fp16", {})["enabled"] = precision == "fp16"
    stage = _get(ds, ("zero_optimization", "stage")) or 0
    if precision == "fp16" and device.cpu:
        raise ConfigError("train.precision=fp16 is not supported on CPU; use fp32 or bf16")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage must be 0-3, got {stage!r}")
    return ds


def _optimizer_section(optim: OptimConfig, offload: bool, gpu: bool) -> dict[str, Any]:
    params: dict[str, Any] = {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                              "weight_decay": optim.weight_decay}
    if not offload:
        # torch's AdamW, which DeepSpeed builds from "torch_adam" and hands the other params.
        # On a GPU its fused kernel updates every parameter (ZeRO: every flat partition) in
        # one launch and needs no build step, where DeepSpeed's FusedAdam is a JIT-compiled op
        # (nvcc, a minute on the first run). With offload, DeepSpeedCPUAdam runs on the host.
        params["torch_adam"] = True
        if gpu:
            params["fused"] = True
    return {"type": "AdamW", "params": params}


def zero_stage(ds: dict[str, Any]) -> int:
    """The ZeRO stage of a merged config (``merge_ds_config`` checked it is 0-3)."""
    return int(_get(ds, ("zero_optimization", "stage")) or 0)


def precision_of(ds: dict[str, Any]) -> str:
    return "bf16" if ds["bf16"]["enabled"] else "fp16" if ds["fp16"]["enabled"] else "fp32"
