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
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "COMMITTED"
LATEST = "latest"
_TAG_RE = re.compile(r"^step_(\d{8,})$")
# Debug hook (tests): SIGKILL the whole process group after this step's shards are written and
# before the commit marker, i.e. a crash in the middle of a checkpoint save.
DEBUG_KILL_IN_SAVE = "ZEROFORGE_DEBUG_KILL_IN_SAVE"


@dataclass
class CheckpointConfig:
    """When and where to checkpoint (YAML key ``checkpoint``)."""

    every: int = 1000  # save every N optimizer steps (and always at the end); 0: only the end
    keep_last: int = 3  # committed checkpoints kept; older ones are deleted
    dir: str | None = None  # None: <run_dir>/checkpoints

    def validate(self) -> list[str]:
        p = []
        if self.every < 0:
            p.append(f"checkpoint.every must be >= 0, got {self.every}")
        if self.keep_last < 1:
            p.append(f"checkpoint.keep_last must be at least 1, got {self.keep_last}")
        return p

    def path(self, run_dir: str | Path) -> Path:
        return Path(self.dir) if self.dir else Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _tags(root: Path) -> list[tuple[int, str]]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _TAG_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p.name))
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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_file(path.parent)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save(engine: Any, root: Path, step: int, client_state: dict[str, Any], keep_last: int,
         rank: int) -> Path:
    """Save and commit checkpoint ``step`` (call on every rank); returns the tag directory."""
    import torch

    tag = tag_for(step)
    tag_dir = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # a partial save of this step from a crashed run
            shutil.rmtree(tag_dir)
    _barrier()
    state = {**client_state, "format_version": FORMAT_VERSION, "step": step}
    engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
    from pipeline.dist import rng_state

    rng_path = tag_dir / f"rng_rank{rank:05d}.pt"
    tmp = rng_path.with_name(rng_path.name + ".tmp")
    torch.save(rng_state(), tmp)
    os.replace(tmp, rng_path)
    # Make every shard durable before anyone can commit. Files written by other ranks have no
    # dirty pages here, so this costs each rank only its own data. Another rank may be renaming
    # its own temporary file meanwhile: a file that vanished is that rank's to sync.
    for p in tag_dir.iterdir():
        if p.is_file() and not p.name.endswith(".tmp"):
            try:
                _fsync_file(p)
            except FileNotFoundError:
                pass
    if rank == 0 and os.environ.get(DEBUG_KILL_IN_SAVE) == str(step):
        log.warning("debug: %s=%d, killing the process group mid-save", DEBUG_KILL_IN_SAVE, step)
        os.killpg(os.getpgid(0), signal.SIGKILL)
    _barrier()
    if rank == 0:
        marker = {"step": step, "time": time.time(), "format_version": FORMAT_VERSION,
                  "config_hash": client_state.get("config_hash"),
                  "store_fingerprint": client_state.get("store_fingerprint"),
                  "model_config": client_state.get("model_config"),
                  # The layout an elastic resume must adapt to (pipeline/elastic.py).
                  "world_size": engine.dp_world_size, "global_batch": engine.train_batch_size()}
        _atomic_write(tag_dir / MARKER, json.dumps(marker, indent=1).encode())
        _atomic_write(root / LATEST, tag.encode())
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


class ResumeError(RuntimeError):
    """A committed checkpoint exists but must not or cannot be resumed from."""


def check_compatible(saved: dict[str, Any], model_config: dict[str, Any], fingerprint: str,
                     where: str) -> None:
    """Refuse a checkpoint written for a different model config or token store."""
    problems = []
    if saved.get("format_version") != FORMAT_VERSION:
        problems.append(f"checkpoint format {saved.get('format_version')!r} is not "
                        f"{FORMAT_VERSION}")
    old_model = saved.get("model_config")
    if old_model != model_config:
        changed = sorted(k for k in set(old_model or {}) | set(model_config)
                         if (old_model or {}).get(k) != model_config.get(k))
        problems.append("the model config changed (" + ", ".join(
            f"model.{k}: {(old_model or {}).get(k)!r} -> {model_config.get(k)!r}"
            for k in changed) + ")")
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
    import torch

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
        from pipeline.dist import set_rng_state

        set_rng_state(torch.load(rng_path, weights_only=False))
    else:
        log.warning("no RNG state for rank %d in %s (world size changed?)", rank, where)
    return client
