"""One module per ``zeroforge`` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``.

They are argument layers over library functions. Each imports the libraries it drives inside
``run``: ``zeroforge X --help`` then never pays for torch or DeepSpeed (several seconds), and
the import can happen under ``stdout_to_stderr`` so that DeepSpeed's import-time chatter does
not corrupt a command's ``--json`` output on stdout.
"""

from __future__ import annotations

import argparse
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


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed with options and positionals in any order (``train --config R --nproc 2
    key=value``: plain argparse takes the overrides only before the first option). A parser
    with a pass-through remainder (``launch``) cannot intermix; it parses as usual."""
    if any(a.nargs == argparse.REMAINDER for a in parser._actions):  # noqa: SLF001
        return parser.parse_args(argv)
    return parser.parse_intermixed_args(argv)
