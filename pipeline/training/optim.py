"""AdamW settings, weight-decay parameter groups and the learning-rate schedule.

The optimizer itself is built by DeepSpeed from the merged DeepSpeed config (``"optimizer":
"auto"`` is filled from ``OptimConfig``; see training/ds_config.py), so ZeRO 1-3, CPU offload
(DeepSpeedCPUAdam) and fused GPU Adam all work from one description. The learning rate is a pure
function of the step counter, set on the optimizer's param groups before every step: resume
needs no scheduler state, and a skipped (non-finite) step cannot shift the schedule.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field
from zeroforge.pipeline.section import Section

SCHEDULES = ("cosine", "linear", "constant")


class OptimConfig(Section):
    """AdamW + schedule + clipping (YAML key ``optim``)."""

    KEY: ClassVar[str] = "optim"

    lr: float = 6e-4  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1  # floor of cosine/linear decay, as a fraction of lr
    warmup_steps: int = 100  # linear warmup from 0 to lr
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    decay_steps: int | None = None  # steps of warmup + decay; None: train.max_steps
    weight_decay: float = 0.1  # not applied to biases, norms and embeddings
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient norm clip; 0 disables

    def problems(self) -> list[str]:
        p = []
        if not self.lr > 0:
            p.append(f"optim.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            p.append(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            p.append(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            p.append(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.decay_steps is not None and self.decay_steps < 1:
            p.append(f"optim.decay_steps must be at least 1, got {self.decay_steps}")
        if self.weight_decay < 0:
            p.append(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            p.append(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            p.append(f"optim.eps must be > 0, got {self.eps}")
        if self.grad_clip < 0:
            p.append(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        return p


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): warmup, then decay to the floor."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    total = cfg.decay_steps or max_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1.0 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _no_decay(name: str, param: torch.nn.Parameter, module: torch.nn.Module) -> bool:
    # Decay only matrices of Linear-like layers: biases, norm gains and embedding tables are
    # excluded (decaying an embedding pulls rare tokens toward 0 for no benefit).
    return param.ndim < 2 or isinstance(module, torch.nn.Embedding)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``decay`` (matrices) and ``no_decay`` (biases, norms, embeddings).

    Tied parameters (GPT-2's LM head = token embedding) appear once, in the group of the first
    module that owns them; an embedding tied to a head is therefore not decayed.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if _no_decay(name, p, module) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def apply_settings(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> list[str]:
    """Set ``optim.weight_decay`` (decay group only), ``betas`` and ``eps`` on every param group.

    Loading a checkpoint restores the saved groups' values, whatever the run config says now;
    resume calls this afterwards so the run trains with its configured values. Returns one
    ``optim.<key>: old -> new`` line per value that changed (empty when none did).
    """
    changes: dict[str, str] = {}
    for group in optimizer.param_groups:
        if group.get("name") not in ("decay", "no_decay"):
            raise RuntimeError(f"optimizer param group {group.get('name')!r} is not one of "
                               "param_groups()'s")
        wanted = {"weight_decay": cfg.weight_decay if group["name"] == "decay" else 0.0,
                  "betas": tuple(cfg.betas), "eps": cfg.eps}
        for key, value in wanted.items():
            old = tuple(group[key]) if key == "betas" else group[key]
            if old != value:
                changes.setdefault(key, f"optim.{key}: {_show(old)} -> {_show(value)}")
            group[key] = value
    return list(changes.values())


def _show(value: object) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's lr (DeepSpeed's ZeRO optimizers expose the inner groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
