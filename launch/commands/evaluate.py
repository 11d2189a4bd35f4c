"""``zeroforge eval``: the validation loss / perplexity of a committed checkpoint, as one JSON
line on stdout (and a summary on stderr)."""

from __future__ import annotations

import argparse
import json
import sys

from zeroforge.launch.commands import stdout_to_stderr
from zeroforge.pipeline.errors import EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="the run's recipe (YAML path or name); optional with --checkpoint, "
                             "whose saved run config is used then")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. data.store=PATH data.val_windows=64")
    parser.add_argument("--checkpoint", default=None, metavar="DIR_OR_TAG",
                        help="a run dir (newest committed checkpoint), a checkpoint dir, or with "
                             "--config a tag such as step_00000020")
    parser.add_argument("--tag", default=None,
                        help="checkpoint tag of the --config run (default: newest committed)")
    parser.add_argument("--split", choices=("val", "train"), default="val",
                        help="store split to evaluate on: data.val_windows fixed windows spread "
                             "evenly over it (default val)")
    parser.add_argument("--json", action="store_true",
                        help="print only the JSON line (no summary on stderr)")


def run(args: argparse.Namespace) -> int:
    with stdout_to_stderr(deepspeed=True):
        from zeroforge.pipeline.dist import discover
        from zeroforge.pipeline.results.evaluate import eval_target, evaluate_checkpoint

    cfg, tag_dir = eval_target(args.config, args.overrides, args.checkpoint, args.tag)
    out = evaluate_checkpoint(cfg, tag_dir, args.split)
    if discover().rank == 0:
        if not args.json:
            s = args.split
            print(f"{tag_dir} (step {out['step']}): {s} loss {out[f'{s}/loss']:.4f}, "
                  f"ppl {out[f'{s}/ppl']:.2f} over {out[f'{s}/tokens']} tokens", file=sys.stderr)
        print(json.dumps(out), flush=True)
    return EXIT_OK
