"""The ``zeroforge`` command: one subcommand per stage, each an argument layer in commands/.

Every command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` (the exit
code). Only the chosen command's module is imported, so ``zeroforge --help`` and one command's
help never pay for torch or DeepSpeed. A ``ZeroforgeError`` (pipeline/errors.py) raised anywhere
below ends here: its one-line message goes to stderr and its code becomes the exit code. So
does Ctrl-C (``KeyboardInterrupt``): one line, the command's ``INTERRUPTED`` advice if it has
one, exit code 130 (EXIT_INTERRUPTED).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys

from zeroforge.launch.commands import parse_args
from zeroforge.launch.local import ERROR_FILE
from zeroforge.pipeline.errors import EXIT_CONFIG, EXIT_INTERRUPTED, ZeroforgeError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prep": ("zeroforge.launch.commands.prep", "tokenize corpora into a sharded Zarr v3 token store"),
    "inspect": ("zeroforge.launch.commands.inspect",
                "describe a token store (tokenizer, splits, counts, size)"),
    "verify": ("zeroforge.launch.commands.verify",
               "check every checksum and invariant of a token store or a run's checkpoints"),
    "train": ("zeroforge.launch.commands.train", "train a model with DeepSpeed ZeRO from a run config"),
    "eval": ("zeroforge.launch.commands.evaluate",
             "validation loss / perplexity of a checkpoint, or lm-evaluation-harness tasks"),
    "sample": ("zeroforge.launch.commands.sample", "generate text from a checkpoint"),
    "export": ("zeroforge.launch.commands.export", "export a checkpoint to Hugging Face format"),
    "launch": ("zeroforge.launch.commands.launch",
               "launch on Slurm (sbatch) or a hostfile cluster (DeepSpeed runner)"),
    "demo": ("zeroforge.launch.commands.demo",
             "run the whole pipeline on the builtin offline corpus (CPU)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zeroforge",
        description="Pretraining pipeline: corpora -> Zarr token store -> DeepSpeed ZeRO -> MLflow.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The DeepSpeed launcher puts --local_rank=N right after the module name; the rank is read
    # from the environment (pipeline/dist.py), so the value is not used.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse only the global part here; the chosen command owns the rest of the arguments.
    global_args, rest = parser.parse_known_args(argv)
    if global_args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    module_name, help_text = COMMANDS[global_args.command]
    logging.basicConfig(
        level=logging.DEBUG if global_args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    name = global_args.command
    try:
        command = importlib.import_module(module_name)
        sub_parser = argparse.ArgumentParser(prog=f"zeroforge {name}", description=help_text)
        command.add_arguments(sub_parser)
        args = parse_args(sub_parser, rest)
        return int(command.run(args) or 0)
    except ZeroforgeError as e:
        report(f"zeroforge {name}: error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        advice = getattr(sys.modules.get(module_name), "INTERRUPTED", "")
        report(f"zeroforge {name}: interrupted" + (f": {advice}" if advice else ""))
        return EXIT_INTERRUPTED


def report(line: str) -> None:
    """The one line a failed command ends with; also appended to $ZEROFORGE_ERROR_FILE when set
    (the ``--nproc`` launcher repeats a rank's line as its own last one: launch/local.py)."""
    print(line, file=sys.stderr, flush=True)
    if os.environ.get(ERROR_FILE):
        with contextlib.suppress(OSError), open(os.environ[ERROR_FILE], "a") as f:
            f.write(line.replace("\n", " ") + "\n")


if __name__ == "__main__":
    sys.exit(main())
