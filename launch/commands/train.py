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

from zeroforge.launch.commands import stdout_to_stderr
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
                        help="ranks on this machine (started through the launcher)")
    parser.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed",
                        help="launcher used with --nproc > 1")


def run(args: argparse.Namespace) -> int:
    with stdout_to_stderr():
        from zeroforge.launch.local import launch_ranks
        from zeroforge.pipeline.config import dump_yaml, load_run_config
        from zeroforge.pipeline.dist import discover
        from zeroforge.pipeline.training.engine import detect_device
        from zeroforge.pipeline.training.main import train

    if args.nproc < 1:
        raise ConfigError("--nproc must be at least 1")
    cfg = load_run_config(args.config, args.overrides)
    if args.print_config:
        world = max(args.nproc, discover().world_size)
        print("# run config (resolved)")
        print(dump_yaml(cfg), end="")
        print(f"# DeepSpeed config (merged, world size {world})")
        print(json.dumps(cfg.ds_config(world, detect_device()), indent=2))
        return EXIT_OK
    if args.nproc > 1 and discover().source == "single":
        return launch_ranks(args.nproc, args.launcher, ["train", "--config", args.config,
                                                        *args.overrides])
    return train(cfg)
