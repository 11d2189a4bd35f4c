"""``zeroforge train``: one DeepSpeed training run (setup -> resume -> fit), any launcher.

    zeroforge train --config gpt2-tiny-cpu train.max_steps=50          # one process
    zeroforge train --config gpt2-tiny-cpu --nproc 2                   # 2 ranks on this machine
    deepspeed --num_gpus 2 --module zeroforge.launch train --config gpt2-tiny-cpu
    torchrun --nproc_per_node 2 -m zeroforge.launch train --config gpt2-tiny-cpu

Exit codes are in pipeline/errors.py (0 done, 1 failed, 2 bad config, 75 preempted after a
checkpoint). Fault-injection variables for tests are in pipeline/debug.py.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from zeroforge.launch.commands import stdout_to_stderr
from zeroforge.launch.local import LAUNCHERS
from zeroforge.pipeline.errors import EXIT_OK, ConfigError

# Said after a second Ctrl-C (the first one checkpoints and exits 75: pipeline/dist.py).
INTERRUPTED = ("stopped without a checkpoint; rerun the same command to resume from the newest "
               "committed one")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="run recipe: a YAML path or a shipped name (e.g. gpt2-tiny-cpu)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.max_steps=50 "
                             "deepspeed.zero_optimization.stage=2")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved run config and merged DeepSpeed config, exit")
    parser.add_argument("--nproc", type=int, default=1,
                        help="ranks on this machine (started as --launcher says)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="zeroforge",
                        help="how --nproc > 1 ranks start: directly (zeroforge, the fastest), "
                             "through the DeepSpeed launcher, or torchrun")


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise ConfigError("--nproc must be at least 1")
    from zeroforge.launch.local import launch_ranks
    from zeroforge.pipeline.dist import discover

    if args.nproc > 1 and not args.print_config and discover().source == "single":
        # The ranks start first; this process checks the config meanwhile (it imports torch,
        # ~1.5 s) and stops them if it is bad, so the error is reported once.
        return launch_ranks(args.nproc, args.launcher,
                            ["train", "--config", args.config, *args.overrides],
                            check=lambda: _config(args))
    with stdout_to_stderr(deepspeed=True):
        from zeroforge.pipeline.config import dump_yaml
        from zeroforge.pipeline.training.engine import detect_device
        from zeroforge.pipeline.training.main import train

    cfg = _config(args)
    if args.print_config:
        world = max(args.nproc, discover().world_size)
        print("# run config (resolved)")
        print(dump_yaml(cfg), end="")
        print(f"# DeepSpeed config (merged, world size {world})")
        print(json.dumps(cfg.ds_config(world, detect_device()), indent=2))
        return EXIT_OK
    return train(cfg)


def _config(args: argparse.Namespace) -> Any:
    with stdout_to_stderr():
        from zeroforge.pipeline.config import load_run_config
    return load_run_config(args.config, args.overrides)
