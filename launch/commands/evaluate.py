"""``zeroforge eval``: a committed checkpoint's validation loss / perplexity as one JSON line on
stdout (and a summary on stderr), or with ``--tasks`` its scores on lm-evaluation-harness tasks
(the harness's result structure with ``--json``, else its tables). On a fine-tuning store the
loss is over the loss-bearing tokens only; ``--generate N`` also generates for N held-out
examples and reports exact match and token F1 (pipeline/results/generations.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zeroforge.launch.commands import stdout_to_stderr
from zeroforge.pipeline.errors import EXIT_OK, ConfigError


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
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="fine-tuning stores: generate for N held-out (val) examples, report "
                             "exact match and token F1")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="with --generate: longest generation (default 128)")
    parser.add_argument("--generations", default=None, metavar="FILE",
                        help="with --generate: JSONL file of the generations (default "
                             "RUN_DIR/generations/TAG.jsonl)")
    parser.add_argument("--json", action="store_true",
                        help="print only the JSON (no summary on stderr; with --tasks the "
                             "harness's result structure instead of its tables)")
    harness = parser.add_argument_group(
        "downstream tasks (lm-evaluation-harness; pip install 'zeroforge[eval]')")
    harness.add_argument("--tasks", default=None, metavar="T1,T2",
                         help="harness task names, comma-separated: evaluate on these instead "
                              "of the validation loss")
    harness.add_argument("--include-path", default=None, metavar="DIR",
                         help="a folder of task YAML files (local tasks over local JSON/JSONL)")
    harness.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                         help="few-shot examples per prompt (default: each task's own)")
    harness.add_argument("--limit", type=int, default=None, metavar="N",
                         help="at most N documents per task")
    harness.add_argument("--batch-size", type=int, default=16, metavar="B",
                         help="requests per forward pass (default 16)")


def run(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        return _run_harness(args)
    with stdout_to_stderr(deepspeed=True):
        from zeroforge.pipeline.dist import discover
        from zeroforge.pipeline.results.evaluate import eval_target, evaluate_checkpoint
        from zeroforge.pipeline.results.generations import generate_held_out

    if args.generate < 0 or args.max_new_tokens < 1:
        raise ConfigError("--generate must be >= 0 and --max-new-tokens at least 1")
    cfg, tag_dir = eval_target(args.config, args.overrides, args.checkpoint, args.tag)
    out = evaluate_checkpoint(cfg, tag_dir, args.split)
    if discover().rank != 0:
        return EXIT_OK
    if args.generate:
        path = Path(args.generations or Path(cfg.run_dir) / "generations" / f"{tag_dir.name}.jsonl")
        out |= generate_held_out(cfg, tag_dir, args.generate, path, args.max_new_tokens)
    if not args.json:
        s = args.split
        print(f"{tag_dir} (step {out['step']}): {s} loss {out[f'{s}/loss']:.4f}, "
              f"ppl {out[f'{s}/ppl']:.2f} over {out[f'{s}/tokens']} tokens", file=sys.stderr)
        if args.generate:
            print(f"generated for {out['generate/examples']} held-out examples: exact match "
                  f"{out['generate/exact_match']:.3f}, token F1 {out['generate/f1']:.3f} "
                  f"({out['generations']})", file=sys.stderr)
    print(json.dumps(out), flush=True)
    return EXIT_OK


def _run_harness(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one task name, e.g. --tasks hellaswag,arc_easy")
    if args.checkpoint is None or args.config or args.overrides or args.tag:
        raise ConfigError("--tasks evaluates --checkpoint DIR (a run dir or checkpoint dir); "
                          "--config, --tag and overrides do not apply")
    if args.generate or args.generations:
        raise ConfigError("--generate scores held-out examples of the run's fine-tuning store; "
                          "run it without --tasks")
    for flag, value, least in (("--limit", args.limit, 1), ("--num-fewshot", args.num_fewshot, 0),
                               ("--batch-size", args.batch_size, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}")
    with stdout_to_stderr():
        try:
            from zeroforge.pipeline.results import harness
        except ImportError as e:  # the optional extra is missing
            raise ConfigError(f"--tasks needs lm-evaluation-harness ({e}): "
                              "pip install 'zeroforge[eval]'") from None
        results = harness.evaluate_checkpoint(args.checkpoint, tasks, args.include_path,
                                              args.num_fewshot, args.limit, args.batch_size)
    if results is not None:  # rank 0
        print(harness.to_json(results) if args.json else harness.to_table(results), flush=True)
    return EXIT_OK
