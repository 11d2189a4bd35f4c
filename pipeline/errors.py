"""Exit codes and the error type that carries one.

Library code raises a ``ZeroforgeError`` (or a subclass) whose message is one line a user can
act on; the ``zeroforge`` dispatcher (launch/cli.py) catches it once, prints the message and
exits with its code. The codes are a contract with launchers and Slurm requeue logic:

    0   finished
    1   failed: crash, too many non-finite steps, a checkpoint that cannot or must not be loaded
    2   bad config or command line (the message names the key or flag)
    75  preempted (EX_TEMPFAIL): stopped by a signal after committing a checkpoint; rerun
    130 interrupted by Ctrl-C before finishing, the shell's code for SIGINT (a training run's
        first Ctrl-C is a preemption: checkpoint, 75; only a second one interrupts)
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130


class ZeroforgeError(Exception):
    """A failure reported as one line; ``exit_code`` is what the command exits with."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(ZeroforgeError, ValueError):
    """A bad run config, DeepSpeed config or command-line value (exit code 2)."""

    exit_code = EXIT_CONFIG


class RunError(ZeroforgeError, RuntimeError):
    """The run cannot go on (exit code 1): e.g. too many non-finite steps, bad checkpoint."""


@contextlib.contextmanager
def reported_as(exit_code: int, *errors: type[BaseException]) -> Iterator[None]:
    """Re-raise ``errors`` (e.g. data_prep's ValueErrors, OSError), which know no exit code, as
    a ZeroforgeError with ``exit_code``; a ZeroforgeError passes through unchanged."""
    try:
        yield
    except ZeroforgeError:
        raise
    except errors as e:
        raise ZeroforgeError(str(e), exit_code) from e


def describe_os_error(e: OSError, where: object = None) -> str:
    """``PATH: reason`` of a failed file operation (``where`` when the error names no file),
    e.g. ``runs/x/metrics.jsonl: No space left on device``."""
    path = e.filename if e.filename is not None else where
    reason = e.strerror or str(e)
    return f"{path}: {reason}" if path is not None else reason


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
