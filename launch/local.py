"""Several ranks on this machine: ``zeroforge train --nproc N`` starts the DeepSpeed launcher
(or torchrun), which starts N copies of ``python -m zeroforge.launch train ...``.

SIGTERM/SIGUSR1 and Ctrl-C (SIGINT) sent to this process are forwarded to the ranks
themselves: both launchers would kill their ranks at once, and a preemption must reach the ranks
so that they checkpoint and exit with 75 (a second Ctrl-C: they abort). The launcher runs in a
session of its own, so a terminal's Ctrl-C reaches only this process, which forwards it; when
the launcher has exited, whatever is left of its session is killed: no rank outlives the command.
A rank's one-line error (launch/cli.py appends it to $ZEROFORGE_ERROR_FILE) is repeated as this
command's last line, below the launcher's own messages.
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
from pathlib import Path

import psutil
from zeroforge.pipeline.dist import PREEMPT_SIGNALS, free_port

# Set for the ranks: a file launch/cli.py appends a failing command's error line to.
ERROR_FILE = "ZEROFORGE_ERROR_FILE"

log = logging.getLogger("zeroforge.launch")

RANK_MODULE = "zeroforge.launch"  # what every rank runs (launch/__main__.py)
_LAUNCHER_MODULES = ("deepspeed.launcher", "torch.distributed.run")


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


def launch_ranks(nproc: int, launcher: str, argv: list[str]) -> int:
    """Start the ranks and wait for them; returns the launcher's exit code."""
    cmd = rank_command(nproc, launcher, argv)
    log.info("launching: %s", " ".join(cmd))
    with tempfile.NamedTemporaryFile("r", prefix="zeroforge-errors-", suffix=".txt") as errors:
        proc = subprocess.Popen(cmd, start_new_session=True,
                                env={**os.environ, ERROR_FILE: errors.name})

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
            code = proc.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # ranks the launcher left behind
        first_error = next(iter(errors.read().splitlines()), None)
    if code != 0 and first_error:
        print(first_error, file=sys.stderr, flush=True)
    return code
