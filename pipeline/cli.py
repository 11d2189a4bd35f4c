"""`zeroforge` command line: one subcommand per stage, each owned by the module that does the work.

Every subcommand module exposes `add_arguments(parser)` and `run(args) -> int` (the exit code).
Modules are imported only when their subcommand runs, so `zeroforge prep --help` never pays for
importing torch or DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prep": ("data_prep.cli", "tokenize corpora into a sharded Zarr v3 token store"),
    "inspect": ("data_prep.cli_inspect", "describe a token store (tokenizer, splits, counts, size)"),
    "verify": ("data_prep.cli_verify", "check every checksum and invariant of a token store"),
    "train": ("pipeline.train", "train a model with DeepSpeed ZeRO from a run config"),
    "eval": ("pipeline.evaluate", "validation loss / perplexity of a checkpoint"),
    "sample": ("pipeline.sample", "generate text from a checkpoint"),
    "export": ("pipeline.export", "export a checkpoint to Hugging Face format"),
    "launch": ("launch.cli", "launch on Slurm (sbatch) or a hostfile cluster (DeepSpeed runner)"),
    "demo": ("pipeline.demo", "run the whole pipeline on the builtin offline corpus (CPU)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zeroforge",
        description="Pretraining pipeline: corpora -> Zarr token store -> DeepSpeed ZeRO -> MLflow.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse only the global part here; the chosen module owns the rest of the arguments.
    global_args, rest = parser.parse_known_args(argv)
    if global_args.command is None:
        parser.print_help()
        return 2
    module_name, help_text = SUBCOMMANDS[global_args.command]
    logging.basicConfig(
        level=logging.DEBUG if global_args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(prog=f"zeroforge {global_args.command}", description=help_text)
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
