"""Checkpoints through DeepSpeed, committed atomically, resumed from the newest committed one.

Layout (``checkpoint.dir``, default ``<run_dir>/checkpoints``)::

    step_00000010/                  one DeepSpeed tag per saved step
        mp_rank_00_model_states.pt  (DeepSpeed's files; client state inside)
        zero_pp_rank_*_optim_states.pt
        rng_rank00000.pt            each rank's RNG states (python, numpy, torch)
        MANIFEST.json               every file above: size and CRC-32C (training/manifest.py)
        COMMITTED                   JSON marker, written last: the checkpoint is complete
    latest                          DeepSpeed's pointer to the newest committed tag

Commit protocol: every rank saves its shards and fsyncs what it wrote, all ranks meet at a
barrier, each rank checksums its share of the files (its own, mostly: still in its page cache),
and only then rank 0 writes ``MANIFEST.json``, ``COMMITTED`` (which records the manifest's
CRC-32C) and ``latest`` (each via temp file + fsync + rename) and prunes old tags; a second
barrier keeps any rank from leaving before the commit. A tag without ``COMMITTED`` (a crash or
SIGKILL during the save) is ignored by resume and deleted at the next save. Resume refuses,
rather than starting over, when a committed checkpoint exists but cannot be loaded or was
written for another model or token store.

Integrity: what is read from a committed checkpoint is checked against its manifest before it
is used (``verify_tag``; on several ranks ``PendingCheck`` shares the files out, and ``load``
runs it beside DeepSpeed's reads at ZeRO 0-2, before them at ZeRO-3). A resume that finds its checkpoint corrupt sets it aside
(``set_aside``: renamed ``<tag>.corrupt-<time>``, kept for inspection, never tried again) and
takes the previous one (training/setup.py).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from zeroforge.data_prep import atomic
from zeroforge.pipeline import debug, registry
from zeroforge.pipeline.errors import RunError, describe_os_error
from zeroforge.pipeline.registry import ModelConfig
from zeroforge.pipeline.training import manifest
from zeroforge.pipeline.training.process import rng_state, set_rng_state

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "COMMITTED"
LATEST = "latest"
_TAG_RE = re.compile(r"^step_(\d{8,})$")
# The rank a checkpoint file belongs to: DeepSpeed's ``zero_pp_rank_R_...`` (ZeRO shards, bf16
# ones too) and our ``rng_rankRRRRR.pt``; files without one (``mp_rank_00_model_states.pt``)
# are written by rank 0.
_RANK_RE = re.compile(r"(?:pp_rank_|rng_rank)(\d+)")
# Free bytes below which a failed write is reported as a full disk (torch.save says only
# "unexpected pos ..."): less than any checkpoint file of a real model.
_NEARLY_FULL = 16 << 20


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


def root_of_run(run_dir: Path) -> Path:
    """A run directory's checkpoint root: ``checkpoint.dir`` of its resolved config, if set."""
    resolved = run_dir / "config.yaml"
    if resolved.is_file():
        try:
            data = yaml.safe_load(resolved.read_text()) or {}
        except yaml.YAMLError:
            data = {}
        custom = (data.get("checkpoint") or {}).get("dir") if isinstance(data, dict) else None
        if custom:
            return Path(custom)
    return run_dir / "checkpoints"


def read_marker(root: Path, tag: str) -> dict[str, Any]:
    path = root / tag / MARKER
    try:
        marker = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: unreadable commit marker ({e})",
                                     tag_dir=root / tag) from None
    if not isinstance(marker, dict):
        raise CorruptCheckpointError(f"{path}: unreadable commit marker (not a JSON object)",
                                     tag_dir=root / tag)
    return marker


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointSaveError(RunError):
    """A checkpoint could not be written (a full disk, say); the run stops (exit code 1)."""


def save(engine: Any, root: Path, step: int, client_state: dict[str, Any], keep_last: int,
         rank: int) -> Path:
    """Save and commit checkpoint ``step`` (call on every rank); returns the tag directory.

    Raises CheckpointSaveError, one line, when this rank cannot write its part: the tag stays
    uncommitted (ignored by resume), and the newest committed checkpoint is untouched.
    """
    try:
        return _save(engine, root, step, client_state, keep_last, rank)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        reason = _why_unwritten(root, e)
        if reason is None:  # not the disk (e.g. a collective whose peer died): a crash
            raise
        newest = latest_committed(root)
        raise CheckpointSaveError(
            f"checkpoint step {step} could not be written to {root / tag_for(step)} "
            f"({reason}); the newest committed checkpoint is "
            f"{'step ' + str(newest[0]) if newest else 'none'}: free space (or set "
            "checkpoint.dir), then rerun the same command") from None


def _why_unwritten(root: Path, e: BaseException) -> str | None:
    """What kept a save from being written, when it was the file system."""
    if isinstance(e, OSError):
        return describe_os_error(e)
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return None
    return f"no space left on the device: {free} bytes free" if free < _NEARLY_FULL else None


def _save(engine: Any, root: Path, step: int, client_state: dict[str, Any], keep_last: int,
          rank: int) -> Path:
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
    files = _gather_entries(tag_dir, rank)
    if rank == 0:
        marker = {"step": step, "time": time.time(), "format_version": FORMAT_VERSION,
                  "config_hash": client_state.get("config_hash"),
                  "store_fingerprint": client_state.get("store_fingerprint"),
                  "model_family": client_state.get("model_family"),
                  "model_config": client_state.get("model_config"),
                  # The layout an elastic resume must adapt to (pipeline/elastic.py).
                  "world_size": engine.dp_world_size, "global_batch": engine.train_batch_size(),
                  "manifest_crc32c": manifest.write(tag_dir, files)}
        atomic.write_bytes(tag_dir / MARKER, json.dumps(marker, indent=1).encode())
        atomic.write_bytes(root / LATEST, tag.encode())
        _prune(root, keep_last)
    _barrier()
    return tag_dir


def _owner(name: str, world: int) -> int:
    """The rank that checksums file ``name``: the rank it belongs to (its page cache holds it
    after a save, and it loads it on a resume), else one spread by name."""
    m = _RANK_RE.search(name)
    return (int(m.group(1)) if m else zlib.crc32(name.encode())) % world


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _gather_entries(tag_dir: Path, rank: int) -> dict[str, manifest.Entry]:
    """Size and CRC-32C of every file of a saved tag (collective); complete on rank 0."""
    world = _world()
    names = manifest.data_files(tag_dir, recursive=False, exclude=[MARKER])
    mine_names = [n for n in names if _owner(n, world) == rank]
    mine = dict(zip(mine_names, manifest.file_entries([tag_dir / n for n in mine_names]),
                    strict=True))
    if world == 1:
        return mine
    parts: list[Any] = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return {k: v for part in parts or [] for k, v in part.items()}


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


def load(engine: Any, root: Path, tag: str, rank: int, module_only: bool = False,
         check: bool = True) -> dict[str, Any]:
    """Load ``tag`` into ``engine`` and restore this rank's RNG; returns the client state.

    ``module_only`` (evaluation) loads just the weights, which also works with another world
    size for ZeRO 0-2. ``check``: the files are checked against the manifest (collective), and
    nothing loaded is used before every rank's share has passed: a mismatch raises
    CorruptCheckpointError naming the file, on every rank. At ZeRO 0-2 the check runs on the
    cores DeepSpeed's reads leave, beside them (``PendingCheck``): run one after the other it
    adds 10-30% to a load from the page cache (benchmarks/checkpoint_verify.py; with no spare
    core, beside costs as much or more: docs/performance.md). That is safe because DeepSpeed's
    load has no collective there: a rank whose read of a damaged file failed still meets its
    peers in the check's gather. At ZeRO-3 the load ends in one (gathering the persistent parameters),
    which such a rank would skip, so the check runs first. ``check=False`` is for a universal
    conversion, made by rank 0 from a checked tag and checked by it (training/elastic.py).
    """
    where = root / tag
    pending = None
    if check and engine.zero_optimization_partition_weights():
        _refuse_corrupt(where, verify_on_ranks(where, rank))
    elif check:
        # One core fewer than there are for the check: DeepSpeed's reads keep one.
        pending = PendingCheck(where, rank, threads=max(1, manifest.usable_cores() - 1))
    failure: Exception | None = None
    try:
        path, client = engine.load_checkpoint(str(root), tag=tag,
                                              load_optimizer_states=not module_only,
                                              load_lr_scheduler_states=False,
                                              load_module_only=module_only)
    except Exception as e:  # noqa: BLE001 -- any failure must stop the run, with the cause
        failure, path, client = e, None, None
    if pending is not None:  # collective: every rank, whether its own load failed or not
        _refuse_corrupt(where, pending.problems())  # corrupt bytes explain a failed load too
    if failure is not None:
        raise ResumeError(f"committed checkpoint {where} could not be loaded ({failure}); "
                          "refusing to start over: fix or move it away") from failure
    if path is None or client is None:
        raise ResumeError(f"committed checkpoint {where} could not be loaded; refusing to "
                          "start over: fix or move it away")
    rng_path = where / f"rng_rank{rank:05d}.pt"
    if module_only:
        pass
    elif rng_path.is_file():
        set_rng_state(_load_rng(rng_path))
    else:
        log.warning("no RNG state for rank %d in %s (world size changed?)", rank, where)
    return client


def _load_rng(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        # Written before RNG files held tensors only (numpy's key array): our own file, from a
        # committed checkpoint, so unpickling it is safe.
        return torch.load(path, weights_only=False)


# ----------------------------------------------------------------------------- integrity


class CorruptCheckpointError(ResumeError):
    """A committed checkpoint whose files do not match its manifest (exit code 1). ``tag_dir``
    is set when a resume may set the checkpoint aside and go back to the previous one."""

    def __init__(self, message: str, tag_dir: Path | None = None) -> None:
        super().__init__(message)
        self.tag_dir = tag_dir


def verify_tag(tag_dir: Path, names: list[str] | None = None, threads: int | None = None
               ) -> list[str]:
    """Problems of a committed tag against its manifest (``names``: only those files; read on
    ``threads`` threads), each naming its file; empty when sound. A tag committed before
    checkpoints had manifests has nothing to check against: a warning says so, and it counts
    as sound."""
    try:
        marker = read_marker(tag_dir.parent, tag_dir.name)
    except ResumeError as e:
        return [str(e)]
    if "manifest_crc32c" not in marker:
        log.warning("%s was committed before checkpoints had manifests: its files cannot be "
                    "verified", tag_dir)
        return []
    try:
        files = manifest.read(tag_dir, marker["manifest_crc32c"])
    except manifest.ManifestError as e:
        return [str(e)]
    return manifest.check(tag_dir, files, names, threads)


class PendingCheck:
    """This rank's share of a tag's check against its manifest, on a thread of its own (reads
    and CRCs release the GIL; ``threads``: how many it reads on, default every usable core up
    to 8): each rank checks its own files and a share of the shared ones. ``problems()`` waits
    for it and gathers every rank's result (collective: call it on every rank, once); every
    rank gets the same list, so all ranks raise or go on together."""

    def __init__(self, tag_dir: Path, rank: int, threads: int | None = None) -> None:
        self.tag_dir, self.world, self._threads = tag_dir, _world(), threads
        names = None if self.world == 1 else self._share(rank)
        self._result: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(names,), daemon=True,
                                        name=f"zeroforge-check-rank{rank}")
        self._thread.start()

    def _share(self, rank: int) -> list[str]:
        try:
            marker = read_marker(self.tag_dir.parent, self.tag_dir.name)
            names = sorted(manifest.read(self.tag_dir, marker.get("manifest_crc32c")))
        except (ResumeError, manifest.ManifestError):
            names = []  # the manifest itself is bad: verify_tag reports it on every rank
        return [n for n in names if _owner(n, self.world) == rank]

    def _run(self, names: list[str] | None) -> None:
        try:
            self._result = verify_tag(self.tag_dir, names, self._threads)
        except Exception as e:  # noqa: BLE001 -- reported like any other problem
            self._result = [f"{self.tag_dir}: cannot be checked ({type(e).__name__}: {e})"]

    def problems(self) -> list[str]:
        self._thread.join()
        if self.world == 1:
            return self._result
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, self._result)
        return sorted({p for part in parts for p in part})


def verify_on_ranks(tag_dir: Path, rank: int) -> list[str]:
    """``verify_tag`` with the files shared out over the ranks (collective)."""
    return PendingCheck(tag_dir, rank).problems()


def _refuse_corrupt(tag_dir: Path, problems: list[str]) -> None:
    if problems:
        raise CorruptCheckpointError(corrupt_message(tag_dir, problems), tag_dir=tag_dir)


def corrupt_message(tag_dir: Path, problems: list[str]) -> str:
    """One line for a corrupt checkpoint (each problem names its file, inside ``tag_dir``)."""
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return f"corrupt checkpoint: {problems[0]}{more}"


def set_aside(tag_dir: Path, rank: int) -> None:
    """Rank 0 renames a corrupt tag ``<tag>.corrupt-<unix time>`` (no longer a tag: never tried
    again, never pruned, kept for inspection) and points ``latest`` at the newest committed
    one left; every rank returns together (collective)."""
    if rank == 0:
        stamp, n = int(time.time()), 0
        while (target := tag_dir.with_name(f"{tag_dir.name}.corrupt-{stamp}"
                                           + (f"-{n}" if n else ""))).exists():
            n += 1
        tag_dir.rename(target)
        log.error("%s set aside as %s", tag_dir, target.name)
        newest = latest_committed(tag_dir.parent)
        if newest is not None:
            atomic.write_bytes(tag_dir.parent / LATEST, newest[1].encode())
    _barrier()
