"""``zeroforge export``: a checkpoint as a Hugging Face ``transformers`` directory.

    zeroforge export --checkpoint runs/gpt2-tiny-cpu --out exports/gpt2-tiny [--register NAME]

``--register NAME`` also logs the export to the MLflow run that wrote the checkpoint and
registers it as a new version of NAME in the Model Registry.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from zeroforge.launch.commands import stdout_to_stderr
from zeroforge.pipeline.errors import (
    EXIT_FAILED,
    EXIT_OK,
    ConfigError,
    ZeroforgeError,
    describe_os_error,
)

log = logging.getLogger("zeroforge.export")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="run dir (newest committed checkpoint) or a checkpoint dir")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it is not empty")
    parser.add_argument("--register", default=None, metavar="NAME",
                        help="log the export to the checkpoint's MLflow run and register it as "
                             "a new version of NAME in the Model Registry")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory (--overwrite only writes "
                          "into an existing directory); choose another --out")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"--out {out} is not empty (pass --overwrite to write into it)")
    if args.register is not None and not args.register.strip():
        raise ConfigError("--register: give a model name")
    with stdout_to_stderr(deepspeed=True):
        from zeroforge.pipeline.results.export import Registration, export

    # Checked first: a registration that cannot happen must not leave an export behind.
    registration = Registration(args.checkpoint) if args.register else None
    try:
        info = export(args.checkpoint, out)
    except OSError as e:  # e.g. a read-only or full --out
        raise ZeroforgeError(f"cannot write the export: {describe_os_error(e, out)}",
                             EXIT_FAILED) from None
    log.info("exported %s to %s", info.tag_dir, out)
    if registration is not None:
        version = registration.register(info, out, args.register)
        log.info("registered %s version %s (step %d)", args.register, version, info.step)
    return EXIT_OK
