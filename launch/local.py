"""Several ranks on this machine: ``zeroforge train --nproc N`` starts the DeepSpeed launcher
(or torchrun), which starts N copies of ``python -m zeroforge.launch train ...``.

SIGTERM/SIGUSR1 sent to this process are forwarded to the ranks themselves: both launchers
would kill their ranks at once, and a preemption must reach the ranks so that they checkpoint
and exit with 75.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from zeroforge.pipeline.dist import PREEMPT_SIGNALS, free_port

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
    proc = subprocess.Popen(cmd)

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
