"""Checkpoints through DeepSpeed, committed atomically, resumed from the newest committed one.

Layout (``checkpoint.dir``, default ``<run_dir>/checkpoints``)::

    step_00000010/                  one DeepSpeed tag per saved step
        mp_rank_00_model_states.pt  (DeepSpeed's files; client state inside)
        zero_pp_rank_*_optim_states.pt
        rng_rank00000.pt            each rank's RNG states (python, numpy, torch)
        COMMITTED                   JSON marker, written last: the checkpoint is complete
    latest                          DeepSpeed's pointer to the newest committed tag

Commit protocol: every rank saves its shards and fsyncs what it wrote, all ranks meet at a
barrier, and only then rank 0 writes ``COMMITTED`` and ``latest`` (each via temp file + fsync +
rename) and prunes old tags; a second barrier keeps any rank from leaving before the commit. A
tag without ``COMMITTED`` (a crash or SIGKILL during the save) is ignored by resume and deleted
at the next save. Resume refuses, rather than starting over, when a committed checkpoint
exists but cannot be loaded or was written for another model or token store.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from zeroforge.data_prep import atomic
from zeroforge.pipeline import debug, registry
from zeroforge.pipeline.errors import RunError
from zeroforge.pipeline.registry import ModelConfig
from zeroforge.pipeline.training.process import rng_state, set_rng_state

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "COMMITTED"
LATEST = "latest"
_TAG_RE = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of_tag(name: str) -> int | None:
    """The step of a checkpoint tag name (``step_00000020`` -> 20); None for other names."""
    m = _TAG_RE.match(name)
    return int(m.group(1)) if m else None


def _tags(root: Path) -> list[tuple[int, str]]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        step = step_of_tag(p.name)
        if step is not None and p.is_dir():
            out.append((step, p.name))
    return sorted(out)


def committed(root: Path) -> list[tuple[int, str]]:
    """(step, tag) of every committed checkpoint, oldest first."""
    return [(s, t) for s, t in _tags(root) if (root / t / MARKER).is_file()]


def partial(root: Path) -> list[tuple[int, str]]:
    return [(s, t) for s, t in _tags(root) if not (root / t / MARKER).is_file()]


def latest_committed(root: Path) -> tuple[int, str] | None:
    tags = committed(root)
    return tags[-1] if tags else None


def read_marker(root: Path, tag: str) -> dict[str, Any]:
    return json.loads((root / tag / MARKER).read_text())


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine: Any, root: Path, step: int, client_state: dict[str, Any], keep_last: int,
         rank: int) -> Path:
    """Save and commit checkpoint ``step`` (call on every rank); returns the tag directory."""
    tag = tag_for(step)
    tag_dir = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # a partial save of this step from a crashed run
            shutil.rmtree(tag_dir)
    _barrier()
    state = {**client_state, "format_version": FORMAT_VERSION, "step": step}
    engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
    atomic.write_with(tag_dir / f"rng_rank{rank:05d}.pt", lambda f: torch.save(rng_state(), f))
    # Make every shard durable before anyone can commit. Files written by other ranks have no
    # dirty pages here, so this costs each rank only its own data. Another rank may be renaming
    # its own temporary file meanwhile: a file that vanished is that rank's to sync.
    for p in tag_dir.iterdir():
        if p.is_file() and not atomic.is_temp(p):
            try:
                atomic.fsync_path(p)
            except FileNotFoundError:
                pass
    debug.kill_in_save(step, rank)
    _barrier()
    if rank == 0:
        marker = {"step": step, "time": time.time(), "format_version": FORMAT_VERSION,
                  "config_hash": client_state.get("config_hash"),
                  "store_fingerprint": client_state.get("store_fingerprint"),
                  "model_family": client_state.get("model_family"),
                  "model_config": client_state.get("model_config"),
                  # The layout an elastic resume must adapt to (pipeline/elastic.py).
                  "world_size": engine.dp_world_size, "global_batch": engine.train_batch_size()}
        atomic.write_bytes(tag_dir / MARKER, json.dumps(marker, indent=1).encode())
        atomic.write_bytes(root / LATEST, tag.encode())
        _prune(root, keep_last)
    _barrier()
    return tag_dir


def _prune(root: Path, keep_last: int) -> None:
    done = committed(root)
    newest = done[-1][0] if done else -1
    for _, tag in done[:-keep_last]:
        shutil.rmtree(root / tag, ignore_errors=True)
    for step, tag in partial(root):
        if step < newest:  # abandoned partial saves; a newer partial one may be in flight
            shutil.rmtree(root / tag, ignore_errors=True)


class ResumeError(RunError):
    """A committed checkpoint exists but must not or cannot be resumed from (exit code 1)."""


def check_compatible(saved: dict[str, Any], model_config: ModelConfig, fingerprint: str,
                     where: str) -> None:
    """Refuse a checkpoint (its marker or client state, ``saved``) written for another model
    family, a model with other weights, or another token store. Fields that leave the weights
    alone (``WEIGHT_NEUTRAL``: dropout, activation checkpointing, ...) may change."""
    problems = []
    if saved.get("format_version") != FORMAT_VERSION:
        problems.append(f"checkpoint format {saved.get('format_version')!r} is not "
                        f"{FORMAT_VERSION}")
    changes = registry.model_changes(saved.get("model_family"), saved.get("model_config") or {},
                                     model_config)
    if changes:
        problems.append("the model changed (" + ", ".join(changes) + ")")
    if saved.get("store_fingerprint") != fingerprint:
        problems.append(f"the token store changed (fingerprint {saved.get('store_fingerprint')}"
                        f" -> {fingerprint})")
    if problems:
        raise ResumeError(f"cannot resume from {where}: " + "; ".join(problems) +
                          ". Use a new run_dir to start a different run.")


def load(engine: Any, root: Path, tag: str, rank: int, module_only: bool = False
         ) -> dict[str, Any]:
    """Load ``tag`` into ``engine`` and restore this rank's RNG; returns the client state.

    ``module_only`` (evaluation) loads just the weights, which also works with another world
    size for ZeRO 0-2.
    """
    where = str(root / tag)
    try:
        path, client = engine.load_checkpoint(str(root), tag=tag,
                                              load_optimizer_states=not module_only,
                                              load_lr_scheduler_states=False,
                                              load_module_only=module_only)
    except Exception as e:  # noqa: BLE001 -- any failure must stop the run, with the cause
        raise ResumeError(f"committed checkpoint {where} could not be loaded ({e}); refusing to "
                          "start over: fix or move it away") from e
    if path is None or client is None:
        raise ResumeError(f"committed checkpoint {where} could not be loaded; refusing to "
                          "start over: fix or move it away")
    rng_path = root / tag / f"rng_rank{rank:05d}.pt"
    if module_only:
        pass
    elif rng_path.is_file():
        set_rng_state(torch.load(rng_path, weights_only=False))
    else:
        log.warning("no RNG state for rank %d in %s (world size changed?)", rank, where)
    return client
