"""`zeroforge launch LAUNCHER ...`: start a run somewhere other than this process.

    zeroforge launch slurm --config X --nodes 2 --gpus-per-node 8 [k=v ...]   # sbatch + srun
    zeroforge launch slurm-prep INPUT... --out STORE --parts 16               # prep job array
    zeroforge launch deepspeed ...                                            # hostfile / pdsh

Each launcher's module is imported, and its options parsed, only when it is chosen, so one
launcher's dependencies (or a missing launcher module) never affect another.
"""

from __future__ import annotations

import argparse
import importlib

from zeroforge.launch.commands import parse_args, stdout_to_stderr

# name -> (module, add_arguments function, run function, one-line help)
LAUNCHERS: dict[str, tuple[str, str, str, str]] = {
    "slurm": ("zeroforge.launch.slurm", "add_train_arguments", "run_train",
              "submit a training run to Slurm (sbatch; one srun task per rank)"),
    "slurm-prep": ("zeroforge.launch.slurm", "add_prep_arguments", "run_prep",
                   "build a token store as a Slurm job array plus a finalize job"),
    "deepspeed": ("zeroforge.launch.hostfile", "add_arguments", "run",
                  "train on a hostfile cluster through the DeepSpeed launcher (pdsh/ssh)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "launchers:\n" + "\n".join(
        f"  {name:<12} {help_text}" for name, (*_, help_text) in LAUNCHERS.items()
    ) + "\n\n`zeroforge launch LAUNCHER --help` lists a launcher's options."
    parser.add_argument("launcher", choices=LAUNCHERS, metavar="LAUNCHER",
                        help=", ".join(LAUNCHERS))
    parser.add_argument("launcher_args", nargs=argparse.REMAINDER, metavar="...",
                        help="the launcher's own options")


def launcher_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """(parser with the launcher's options, its run function)."""
    module_name, add_name, run_name, help_text = LAUNCHERS[name]
    with stdout_to_stderr():
        module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"zeroforge launch {name}", description=help_text)
    getattr(module, add_name)(parser)
    return parser, getattr(module, run_name)


def run(args: argparse.Namespace) -> int:
    parser, run_launcher = launcher_parser(args.launcher)
    return int(run_launcher(parse_args(parser, args.launcher_args)) or 0)
