"""Several ranks on this machine: ``zeroforge train --nproc N`` starts N copies of
``python -m zeroforge.launch train ...``, itself (the default) or through the DeepSpeed launcher
or torchrun (``--launcher``).

Started directly, each rank gets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE /
MASTER_ADDR / MASTER_PORT (pipeline/dist.py reads them as the ``env`` launcher) and the ranks
start at once: the DeepSpeed launcher puts two more Python processes that import DeepSpeed (3-8
s) between this command and the ranks. When a rank fails, the others get ``RANK_GRACE_S`` to
notice on their own (a peer's closed connection fails their next collective; rank 0 then marks
its MLflow run FAILED), and are killed after that; the first non-zero exit code is returned.

SIGTERM/SIGUSR1 and Ctrl-C (SIGINT) sent to this process are forwarded to the ranks themselves
(the other launchers would kill their ranks at once): a preemption must reach the ranks so that
they checkpoint and exit with 75 (a second Ctrl-C: they abort). The ranks, or the launcher, run
in a session of their own, so a terminal's Ctrl-C reaches only this process, which forwards it;
when the ranks or the launcher have exited, whatever is left of that session is killed: no rank
outlives the command. A rank's one-line error (launch/cli.py appends it to
$ZEROFORGE_ERROR_FILE) is repeated as this command's last line, below the launchers' messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from zeroforge.pipeline.dist import PREEMPT_SIGNALS, free_port

# Set for the ranks: a file launch/cli.py appends a failing command's error line to.
ERROR_FILE = "ZEROFORGE_ERROR_FILE"

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
    with tempfile.NamedTemporaryFile("r", prefix="zeroforge-errors-", suffix=".txt") as errors:
        env = {**os.environ, ERROR_FILE: errors.name}
        if launcher == "zeroforge":
            code = _spawn_ranks(nproc, argv, env, check)
        else:
            code = _run_launcher(rank_command(nproc, launcher, argv), env, check)
        first_error = next(iter(errors.read().splitlines()), None)
    if code != 0 and first_error:
        print(first_error, file=sys.stderr, flush=True)
    return code


def rank_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    """The environment of local rank ``rank`` of ``nproc`` started by this command."""
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _kill_session(pgid: int) -> None:
    """SIGKILL what is left of a process group this command started (ranks, their children)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _run_launcher(cmd: list[str], env: dict[str, str], check: Callable[[], object]) -> int:
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)

    def forward(signum: int, frame: object) -> None:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            try:
                if is_rank(child.cmdline()):
                    child.send_signal(signum)
            except psutil.NoSuchProcess:
                continue

    for sig in (*PREEMPT_SIGNALS, signal.SIGINT):
        signal.signal(sig, forward)
    try:
        check()
        return proc.wait()
    finally:  # ranks the launcher left behind, or all of it when the check failed
        _kill_session(proc.pid)


def _spawn_ranks(nproc: int, argv: list[str], env: dict[str, str],
                 check: Callable[[], object]) -> int:
    port = free_port()
    cmd = [sys.executable, "-m", RANK_MODULE, *argv]
    log.info("launching %d ranks: %s", nproc, " ".join(cmd))
    # Each rank leads a session of its own (a process cannot join a group of another session).
    ranks = [subprocess.Popen(cmd, env={**env, **rank_env(r, nproc, port)},
                              start_new_session=True) for r in range(nproc)]

    def forward(signum: int, frame: object) -> None:
        for p in ranks:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (*PREEMPT_SIGNALS, signal.SIGINT):
        signal.signal(sig, forward)
    try:
        check()
        return _supervise(ranks)
    finally:  # this command never leaves a rank (or a rank's child) behind, whatever ended it
        for p in ranks:
            _kill_session(p.pid)
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
