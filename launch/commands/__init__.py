"""One module per ``zeroforge`` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``.

They are argument layers over library functions. Each imports the libraries it drives inside
``run``: ``zeroforge X --help`` then never pays for torch or DeepSpeed (several seconds), and
the import can happen under ``stdout_to_stderr`` so that DeepSpeed's import-time chatter does
not corrupt a command's ``--json`` output on stdout.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def stdout_to_stderr(deepspeed: bool = False) -> Iterator[None]:
    """Imports made inside go to stderr with anything they print, and DeepSpeed's logger (which
    writes to stdout) is pointed at stderr: stdout stays for the command's results.

    ``deepspeed``: import DeepSpeed first, without the optional imports of features zeroforge
    never uses (pipeline/lean_imports.py: seconds per process)."""
    with contextlib.redirect_stdout(sys.stderr):
        if deepspeed:
            from zeroforge.pipeline.lean_imports import import_deepspeed

            import_deepspeed()
        yield
    for handler in logging.getLogger("DeepSpeed").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
