"""Several ranks on this machine: ``zeroforge train --nproc N`` starts N copies of
``python -m zeroforge.launch train ...``, itself (the default) or through the DeepSpeed launcher
or torchrun (``--launcher``).

Started directly, each rank gets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE /
MASTER_ADDR / MASTER_PORT (pipeline/dist.py reads them as the ``env`` launcher) and the ranks
start at once: the DeepSpeed launcher puts two more Python processes that import DeepSpeed (3-8
s) between this command and the ranks. When a rank fails, the others get ``RANK_GRACE_S`` to
notice on their own (a peer's closed connection fails their next collective; rank 0 then marks
its MLflow run FAILED), and are killed after that; the first non-zero exit code is returned.

SIGTERM/SIGUSR1 sent to this process are forwarded to the ranks themselves (the other
launchers would kill their ranks at once): a preemption must reach the ranks so that they
checkpoint and exit with 75.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from zeroforge.pipeline.dist import PREEMPT_SIGNALS, free_port

log = logging.getLogger("zeroforge.launch")

RANK_MODULE = "zeroforge.launch"  # what every rank runs (launch/__main__.py)
_LAUNCHER_MODULES = ("deepspeed.launcher", "torch.distributed.run")
LAUNCHERS = ("zeroforge", "deepspeed", "torchrun")
RANK_GRACE_S = 15.0  # after one rank failed: time the others get to stop by themselves


def rank_command(nproc: int, launcher: str, argv: list[str]) -> list[str]:
    """The command that starts ``nproc`` ranks of ``zeroforge <argv>`` through ``launcher``."""
    port = str(free_port())
    if launcher == "deepspeed":
        exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
        return [exe, "--num_gpus", str(nproc), "--master_port", port, "--module", RANK_MODULE,
                *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", port, "-m", RANK_MODULE, *argv]


def is_rank(cmdline: list[str]) -> bool:
    """Whether a process's command line is one of our ranks (not a launcher process, whose
    command line names our module too)."""
    text = " ".join(cmdline)
    return (f"-m {RANK_MODULE} " in f"{text} "
            and not any(launcher in text for launcher in _LAUNCHER_MODULES))


def launch_ranks(nproc: int, launcher: str, argv: list[str],
                 check: Callable[[], object] = lambda: None) -> int:
    """Start the ranks and wait for them; returns the exit code (the launcher's, or the first
    non-zero one of a rank this command started). ``check`` runs while the ranks start up; an
    exception from it (a bad config) stops them at once and is re-raised."""
    if launcher == "zeroforge":
        return _spawn_ranks(nproc, argv, check)
    cmd = rank_command(nproc, launcher, argv)
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd)
    try:
        check()
    except BaseException:
        _kill_tree(proc.pid)
        raise

    def forward(signum: int, frame: object) -> None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if is_rank(child.cmdline()):
                    child.send_signal(signum)
            except psutil.NoSuchProcess:
                continue

    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, forward)
    return proc.wait()


def rank_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    """The environment of local rank ``rank`` of ``nproc`` started by this command."""
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and everything it started (nothing of the run has begun yet)."""
    try:
        root = psutil.Process(pid)
        for p in [*root.children(recursive=True), root]:
            p.kill()
    except psutil.NoSuchProcess:
        pass


def _spawn_ranks(nproc: int, argv: list[str], check: Callable[[], object]) -> int:
    port = free_port()
    cmd = [sys.executable, "-m", RANK_MODULE, *argv]
    log.info("launching %d ranks: %s", nproc, " ".join(cmd))
    ranks = [subprocess.Popen(cmd, env=rank_env(r, nproc, port)) for r in range(nproc)]

    def forward(signum: int, frame: object) -> None:
        for p in ranks:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, forward)
    try:
        check()
        return _supervise(ranks)
    finally:  # this command never leaves a rank behind, whatever ended it
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()


def _supervise(ranks: list[subprocess.Popen]) -> int:
    """Wait for every rank; after the first failure, give the rest ``RANK_GRACE_S``."""
    failed: int | None = None
    deadline = None
    while any(p.poll() is None for p in ranks):
        codes = [p.returncode for p in ranks if p.returncode not in (None, 0)]
        if codes and failed is None:
            failed = codes[0]
            deadline = time.monotonic() + RANK_GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            log.error("a rank exited with %s; stopping the ranks still running", failed)
            for p in ranks:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    codes = [p.returncode for p in ranks if p.returncode != 0]
    if failed is None and codes:
        failed = codes[0]
    return 0 if failed is None else (failed if failed > 0 else 1)
