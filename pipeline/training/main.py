"""``train(cfg)``: one rank's whole run (process group, setup, the loop), any launcher.

Every launcher starts the same command on every rank (``python -m zeroforge.launch train
...``); the rank, world size and master address come from the launcher's environment
(pipeline/dist.py).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator

import torch.distributed as dist
from zeroforge.data_prep.storage import StorageError
from zeroforge.data_prep.store import StoreError
from zeroforge.pipeline.config import RunConfig
from zeroforge.pipeline.dist import PreemptionFlag, discover
from zeroforge.pipeline.errors import (
    EXIT_OK,
    ConfigError,
    RunError,
    ZeroforgeError,
    describe_os_error,
)
from zeroforge.pipeline.results.export import export, model_tags
from zeroforge.pipeline.tracking.tracker import tracking_status
from zeroforge.pipeline.training.loop import fit
from zeroforge.pipeline.training.process import init_distributed
from zeroforge.pipeline.training.setup import setup
from zeroforge.pipeline.training.startup import StartupClock
from zeroforge.pipeline.training.state import Run

log = logging.getLogger("zeroforge.train")


def _quiet_other_ranks(rank: int) -> None:
    if rank != 0:
        # Rank-0-only logs: other ranks speak up for warnings and errors.
        logging.getLogger().setLevel(logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _register_final_model(run: Run, name: str) -> None:
    """``tracking.register_model``: the final checkpoint (committed by every rank) exported to
    ``<run_dir>/export`` and registered as a new version of ``name`` from the run."""
    out = run.run_dir / "export"
    if out.exists():
        shutil.rmtree(out)  # the previous end of this run (a resumed run ends again)
    info = export(run.ckpt_dir, out)
    version = run.tracker.register_model(out, name, info.step, model_tags(info))
    if version is not None:
        log.info("registered %s version %s (step %d, %s)", name, version, info.step, out)


@contextlib.contextmanager
def _timeouts_reported(timeout_s: float | None, rank: int) -> Iterator[None]:
    """A collective that timed out (gloo: "Timed out waiting ...", NCCL: DistBackendError) as
    one line that says what happened, instead of a backend traceback."""
    try:
        yield
    except RuntimeError as e:
        if not (isinstance(e, dist.DistBackendError) or "Timed out" in str(e)):
            raise
        limit = f"{timeout_s:g} s" if timeout_s is not None else "DeepSpeed's default"
        raise RunError(f"rank {rank}: a collective waited longer than dist.timeout ({limit}) "
                       f"for the other ranks; one of them stopped responding "
                       f"({str(e).splitlines()[0][-120:]})") from e


def train(cfg: RunConfig) -> int:
    """Run this process's rank (call once per rank); returns the exit code."""
    clock = StartupClock()
    clock.mark("python and imports")
    d = discover()
    _quiet_other_ranks(d.rank)
    preempt = PreemptionFlag(announce=d.rank == 0).install()
    device = init_distributed(d, cfg.dist.timeout)
    clock.mark("process group")
    try:
        run = setup(cfg, d, device, clock)
    except ZeroforgeError:
        raise
    except (StoreError, StorageError) as e:  # corrupt, incomplete or unreachable data
        raise RunError(str(e)) from None
    except ValueError as e:  # a bad model field or weights file: the input is wrong
        raise ConfigError(str(e)) from None
    except OSError as e:  # the machine: e.g. a read-only run_dir
        raise RunError(describe_os_error(e)) from None
    try:
        with tracking_status(run.tracker), _timeouts_reported(cfg.dist.timeout, d.rank):
            code = fit(run, preempt)
            if code == EXIT_OK and run.is_main and cfg.tracking.register_model:
                _register_final_model(run, cfg.tracking.register_model)
    except StoreError as e:  # e.g. a chunk failing its checksum, raised by the loader thread
        raise RunError(f"{e} (`zeroforge verify` checks the whole store)") from None
    except StorageError as e:  # a store on S3 that fails mid-run (server, network, credentials)
        raise RunError(str(e)) from None
    except OSError as e:  # e.g. a full disk under metrics.jsonl
        raise RunError(describe_os_error(e)) from None
    except RuntimeError:
        if preempt.interrupts:
            # Ctrl-C was pressed: another rank took it as the second one and aborted, so this
            # rank's collective lost its peer. An interruption, not a crash.
            raise KeyboardInterrupt from None
        raise
    finally:
        run.loader.close()
        if run.is_main:
            run.metrics.close()
            run.progress.close()
    if run.is_main and code == EXIT_OK:
        log.info("done: %d steps, %d skipped; run dir %s", run.state.step,
                 run.state.skipped_steps, run.run_dir)
    return code
