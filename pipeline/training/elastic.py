"""Elastic resume: continue a run checkpointed with W ranks on W' != W ranks (a node lost or
regained) as if it had never stopped.

Three things carry over:

- The global batch G = micro_batch * grad_accum * world. The checkpoint's commit marker records
  G and W; on resume with W' ranks ``train.grad_accum`` becomes G / (micro_batch * W'), unless
  the configured values already give G (an explicit setting is honoured). When micro_batch * W'
  does not divide G the run stops with an error naming the keys to change.
- The global sample order. pipeline/data.py orders samples by (seed, global index) alone and its
  state is the count of global samples consumed, so with G kept the resumed loader hands out
  exactly the samples of an uninterrupted run; only their split over ranks and micro-batches
  changes.
- The optimizer state. ZeRO 1-3 partition the fp32 master weights and Adam moments per
  data-parallel rank, and DeepSpeed refuses shards written for another DP world size. Rank 0
  converts the checkpoint once with DeepSpeed's own ``ds_to_universal`` into the *universal*
  layout (one directory per parameter with its full fp32 weights, exp_avg, exp_avg_sq and step)
  under ``<tag>/universal/`` (temp directory + rename, so a crash never leaves half of one); the
  other ranks wait at a barrier, then every rank loads it with ``checkpoint.load_universal`` set
  in the DeepSpeed config, which re-partitions it for the new world size. Stage 0 keeps the
  whole optimizer state on every rank and loads as usual.

The conversion lives inside the tag directory so pruning old checkpoints removes it too, and it
is reused if the same checkpoint is resumed at another world size again. It carries a manifest
of its own (training/manifest.py); one that no longer matches is converted again.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.checkpoint import ds_to_universal
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from zeroforge.data_prep import atomic
from zeroforge.pipeline.config import RunConfig
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.training import checkpoint as ckpt
from zeroforge.pipeline.training import manifest
from zeroforge.pipeline.training.ds_config import zero_stage
from zeroforge.pipeline.training.engine import require_tested_deepspeed

log = logging.getLogger("zeroforge.train")

UNIVERSAL_DIR = "universal"  # inside the tag directory it was converted from
_TMP_PREFIX = ".universal.tmp"


@dataclass(frozen=True)
class SavedLayout:
    """How the checkpoint was trained: data-parallel world size and global batch."""

    world_size: int
    global_batch: int


def saved_layout(tag_dir: Path) -> SavedLayout:
    """The layout recorded in the commit marker; for markers written before it recorded one,
    DeepSpeed's ``dp_world_size`` and the loader's ``global_batch`` from the model-states file."""
    marker = ckpt.read_marker(tag_dir.parent, tag_dir.name)
    world, batch = marker.get("world_size"), marker.get("global_batch")
    if world is None or batch is None:
        files = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))
        if not files:
            raise ckpt.ResumeError(f"{tag_dir}: no model-states file to read the world size from")
        # mmap: only the small metadata is read, not the weights.
        state = torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)
        world, batch = state["dp_world_size"], state["data"]["global_batch"]
    return SavedLayout(int(world), int(batch))


def grad_accum_for(micro_batch: int, grad_accum: int, world_size: int, saved: SavedLayout,
                   where: str) -> int:
    """``train.grad_accum`` that keeps the saved global batch with ``world_size`` ranks."""
    if micro_batch * grad_accum * world_size == saved.global_batch:
        return grad_accum  # the configured values already keep it
    per_micro_step = micro_batch * world_size
    if saved.global_batch % per_micro_step:
        raise ConfigError(
            f"train.micro_batch_size={micro_batch} x {world_size} ranks does not divide the global "
            f"batch {saved.global_batch} of {where} (trained with {saved.world_size} ranks): set "
            f"train.micro_batch_size and train.grad_accum so that micro_batch_size * grad_accum * "
            f"{world_size} = {saved.global_batch}")
    return saved.global_batch // per_micro_step


@dataclass(frozen=True)
class ResumePlan:
    """What resuming needs to adapt; the default (no checkpoint, same world) adapts nothing."""

    world_size: int = 1
    tag_dir: Path | None = None
    saved: SavedLayout | None = None
    grad_accum: int | None = None  # the value to train with; None: as configured

    @property
    def world_changed(self) -> bool:
        return self.saved is not None and self.saved.world_size != self.world_size

    def run_config(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` with the grad_accum that keeps the global batch."""
        if self.grad_accum is None or self.grad_accum == cfg.train.grad_accum:
            return cfg
        return cfg.with_grad_accum(self.grad_accum)

    def ds_config(self, ds: dict[str, Any]) -> dict[str, Any]:
        """The merged DeepSpeed config, set to load a universal checkpoint when one is needed."""
        if self.world_changed and zero_stage(ds) >= 1:
            ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
        return ds

    def load(self, engine: Any, root: Path, tag: str, rank: int) -> dict[str, Any]:
        """``checkpoint.load`` of ``tag``; through its universal conversion (made now if missing)
        when the engine is set to load one. Returns the client state."""
        if not engine.load_universal_checkpoint():
            return ckpt.load(engine, root, tag, rank)
        assert self.tag_dir == root / tag, (self.tag_dir, root / tag)
        universal = ensure_universal(self.tag_dir, rank)
        # Checked by rank 0 (ensure_universal); it has no commit marker of its own.
        client = ckpt.load(engine, self.tag_dir, UNIVERSAL_DIR, rank, check=False)
        _repair_optimizer(engine, universal)
        return client


def plan_resume(ckpt_dir: Path, latest: tuple[int, str] | None, micro_batch: int,
                grad_accum: int, world_size: int, rank: int) -> ResumePlan:
    """Compare the layout of ``latest`` (the newest committed checkpoint: training/setup.py)
    with this launch (call on every rank, before the engine is built:
    DeepSpeed's config depends on the result)."""
    if latest is None:
        return ResumePlan(world_size=world_size)
    tag_dir = ckpt_dir / latest[1]
    saved = saved_layout(tag_dir)
    if saved.world_size == world_size:
        return ResumePlan(world_size=world_size, tag_dir=tag_dir, saved=saved)
    accum = grad_accum_for(micro_batch, grad_accum, world_size, saved, str(tag_dir))
    if rank == 0:
        log.warning("ELASTIC RESUME: %s was trained with %d ranks, this run has %d; keeping the "
                    "global batch of %d samples with train.micro_batch_size=%d and "
                    "train.grad_accum=%d (configured: %d)", tag_dir, saved.world_size,
                    world_size, saved.global_batch, micro_batch, accum, grad_accum)
    return ResumePlan(world_size=world_size, tag_dir=tag_dir, saved=saved, grad_accum=accum)


# ----------------------------------------------------------------------------- conversion


def ensure_universal(tag_dir: Path, rank: int) -> Path:
    """``<tag_dir>/universal``, converted by rank 0 if missing; all ranks return together.

    Raises ResumeError on every rank when the conversion fails on rank 0.
    """
    out = tag_dir / UNIVERSAL_DIR
    error, corrupt = None, None
    if rank == 0 and out.is_dir() and (problems := manifest.verify(out)):
        # Derived from a checked checkpoint: convert it again rather than load bad bytes.
        log.warning("%s: %s; converting again", out, problems[0])
        shutil.rmtree(out)
    if rank == 0 and not out.is_dir():
        # The converter reads every file of the tag: check them all first.
        if problems := ckpt.verify_tag(tag_dir):
            corrupt = ckpt.corrupt_message(tag_dir, problems)
        else:
            try:
                _convert(tag_dir, out)
            except Exception as e:  # noqa: BLE001 -- reported on every rank below
                error = f"{type(e).__name__}: {e}"
    box: list[Any] = [error, corrupt]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise ckpt.CorruptCheckpointError(box[1], tag_dir=tag_dir)
    if box[0] is not None:
        raise ckpt.ResumeError(f"cannot convert {tag_dir} for a different world size: "
                               f"{box[0]}")
    return out


def _convert(tag_dir: Path, out: Path) -> None:
    """Convert a committed ZeRO checkpoint into ``out`` (temp directory, fsync, rename)."""
    for stale in tag_dir.glob(f"{_TMP_PREFIX}*"):  # from a conversion that crashed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tag_dir / f"{_TMP_PREFIX}{os.getpid()}"
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True,
                              # zeroforge's model declares no tensor-parallel layout: say so.
                              inject_missing_state=True)
    log.info("converting %s to DeepSpeed's universal checkpoint format", tag_dir)
    chatter = io.StringIO()  # the converter prints and draws progress bars
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = chatter.getvalue().strip().splitlines()[-3:]
        raise RuntimeError(f"{e} ({' | '.join(tail)})") from e
    finally:
        # The converter points <parent>/latest_universal at its output; we always load by path.
        (tag_dir / "latest_universal").unlink(missing_ok=True)
    # Each rank restores its own RNG states if it existed before (training/checkpoint.py).
    for rng in tag_dir.glob("rng_rank*.pt"):
        shutil.copy2(rng, tmp / rng.name)
    names = manifest.data_files(tmp, recursive=True)
    manifest.write(tmp, dict(zip(names, manifest.file_entries([tmp / n for n in names]),
                                 strict=True)))
    atomic.replace_dir(tmp, out)


def _repair_optimizer(engine: Any, universal: Path) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (no-ops at stages 1-2).

    It copies the *first* param group's hyperparameters onto every group (our no-decay group
    would get weight decay), and gives every group the same ``step`` tensor object, which torch's
    AdamW then increments once per group per step (wrong bias correction). Restore each group's
    saved hyperparameters, as a same-world resume does, and give each state its own step.
    """
    require_tested_deepspeed("repairing a ZeRO-3 universal checkpoint load")
    # weights_only, allowing the two DeepSpeed classes the file holds (and nothing else).
    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum]):
        saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu",
                           weights_only=True)["param_groups"]
    base = engine.optimizer.optimizer  # the torch optimizer inside DeepSpeed's ZeRO wrapper
    if len(saved) != len(base.param_groups):
        raise ckpt.ResumeError(f"{universal}: {len(saved)} optimizer param groups saved, "
                               f"{len(base.param_groups)} now")
    for group, old in zip(base.param_groups, saved, strict=True):
        group.update({k: v for k, v in old.items() if k != "params"})
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
