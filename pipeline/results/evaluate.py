"""Validation loss / perplexity over the fixed evaluation windows, during training and of a
committed checkpoint (``zeroforge eval``).

``evaluate`` sums token losses and token counts (float64) over this rank's share of the fixed
batches and all-reduces both, so the result is a token-weighted mean over the whole set,
identical on every rank and on every call.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from zeroforge.pipeline import registry
from zeroforge.pipeline.config import RunConfig, apply_overrides, build_run_config, load_run_config
from zeroforge.pipeline.data.eval_set import eval_batches
from zeroforge.pipeline.data.windows import open_stores, store_fingerprint
from zeroforge.pipeline.dist import DistEnv, discover
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.results.weights import (
    CheckpointError,
    load_model,
    read_checkpoint,
    resolve_checkpoint,
)
from zeroforge.pipeline.tasks.base import Task
from zeroforge.pipeline.training import checkpoint as ckpt
from zeroforge.pipeline.training.engine import build_engine, detect_device
from zeroforge.pipeline.training.process import init_distributed


def evaluate(model: Any, batches: list[dict], task: Task, device: str) -> dict[str, float]:
    """``{"val/loss", "val/ppl", "val/tokens"}`` over every rank's batches (call on all ranks)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        with torch.no_grad():
            for batch in batches:
                s, n = task.loss_sum(model, batch, device)
                total += s
                count += n
    finally:
        model.train(was_training)
    sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    total_f, count = float(sums[0]), int(sums[1])
    if count == 0:
        raise ConfigError("data.val_windows: no validation tokens to evaluate on")
    loss = total_f / count
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 700.0)), "val/tokens": count}


def eval_target(config: str | None, overrides: list[str], checkpoint: str | None,
                tag: str | None) -> tuple[RunConfig, Path]:
    """(run config, committed tag dir) that ``zeroforge eval`` names: ``--checkpoint`` (a run
    dir, checkpoint root or tag dir; with ``--config`` also a tag name), or ``--config``'s
    newest (or ``--tag``) checkpoint. Without ``--config`` the checkpoint's saved run config is
    used, with ``overrides`` applied."""
    if config is None and checkpoint is None:
        raise ConfigError("give --config (the run's newest checkpoint) or --checkpoint")
    cfg = load_run_config(config, overrides) if config else None
    if checkpoint is not None:
        where = Path(checkpoint)
        if cfg is not None and not where.exists():
            where = cfg.checkpoint.path(Path(cfg.run_dir)) / checkpoint
        tag_dir = resolve_checkpoint(where)
    else:
        assert cfg is not None
        root = cfg.checkpoint.path(Path(cfg.run_dir))
        tag_dir = resolve_checkpoint(root) if tag is None else root / tag
        if not (tag_dir / ckpt.MARKER).is_file():
            raise CheckpointError(f"--tag {tag}: not a committed checkpoint in {root}")
    if cfg is None:
        info, _ = read_checkpoint(tag_dir, weights=False)
        try:
            cfg = build_run_config(apply_overrides(info.run_config, overrides))
        except ConfigError as e:
            raise ConfigError(f"{tag_dir} (saved run config): {e}") from None
    return cfg, tag_dir


def evaluate_checkpoint(cfg: RunConfig, tag_dir: Path, split: str = "val") -> dict[str, Any]:
    """The checkpoint's loss over ``split``'s fixed windows, with its step and tag.

    One process loads the weights directly (results/weights.py: any ZeRO stage, any training
    world size, no DeepSpeed engine); under a multi-rank launcher every rank loads them through
    DeepSpeed instead and the batches are shared out.
    """
    d = discover()
    if d.world_size == 1:
        model, task, step, device = _load_single(cfg, tag_dir)
    else:
        device = init_distributed(d)
        model, task, step = _load_on_ranks(cfg, d, tag_dir)
    batches = eval_batches(task, cfg.train.eval_micro_batch, d.rank, d.world_size, split)
    result = evaluate(model, batches, task, device)
    result = {k.replace("val/", f"{split}/"): v for k, v in result.items()}
    return {"step": step, "tag": tag_dir.name, "checkpoint": str(tag_dir), "split": split,
            **result}


def _load_single(cfg: RunConfig, tag_dir: Path) -> tuple[Any, Task, int, str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, info = load_model(tag_dir, device)
    wanted = cfg.build_model_config().to_dict()
    if info.model_config.to_dict() != wanted:
        changed = sorted(k for k in wanted if info.model_config.to_dict().get(k) != wanted[k])
        raise CheckpointError(f"{tag_dir}: the checkpoint's model differs from the config's "
                              f"(model.{', model.'.join(changed)})")
    tokenizer = open_stores(cfg.data)[0].tokenizer
    if info.tokenizer is not None and info.tokenizer != tokenizer:
        raise CheckpointError(f"data.store: tokenizer {tokenizer!r}, but {tag_dir} was trained "
                              f"with {info.tokenizer!r}")
    task = registry.make_task(cfg.task_name, cfg.data, info.model_config)
    return model, task, info.step, device


def _load_on_ranks(cfg: RunConfig, d: DistEnv, tag_dir: Path) -> tuple[Any, Task, int]:
    fingerprint = store_fingerprint(open_stores(cfg.data))
    model_config = cfg.build_model_config()
    model = registry.family_of(model_config).build(model_config)
    engine = build_engine(model, cfg.ds_config(d.world_size, detect_device()), cfg.optim)
    client = ckpt.load(engine, tag_dir.parent, tag_dir.name, d.rank, module_only=True)
    ckpt.check_compatible(client, model_config.to_dict(), fingerprint, str(tag_dir))
    task = registry.make_task(cfg.task_name, cfg.data, model_config)
    return engine, task, int(client.get("step", 0))
