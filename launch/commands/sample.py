"""``zeroforge sample``: generate text from a checkpoint, in one process, on CPU by default.

    zeroforge sample --checkpoint runs/gpt2-tiny-cpu --prompt "ROMEO:" --max-new-tokens 64
    zeroforge sample --checkpoint runs/t5-tiny-cpu --prompt "To be, or <extra_id_0> to be"
"""

from __future__ import annotations

import argparse
import json
import logging

from zeroforge.launch.commands import stdout_to_stderr
from zeroforge.pipeline.errors import EXIT_OK, ConfigError

log = logging.getLogger("zeroforge.sample")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="run dir (newest committed checkpoint) or a checkpoint dir "
                             "(run_dir/checkpoints/step_N)")
    parser.add_argument("--prompt", default="",
                        help="text to continue (GPT) or encoder input (encoder-decoder); "
                             "empty: GPT starts from <|endoftext|>")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="0: greedy decoding (then top-k/top-p/seed do not matter)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k likeliest tokens")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling: keep the smallest set with this probability")
    parser.add_argument("--seed", type=int, default=1234,
                        help="sampling seed (same seed, same samples)")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--tokenizer", default=None,
                        help="override the tokenizer recorded in the checkpoint (e.g. gpt2)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per sample: prompt, completion, token ids")


def _problems(args: argparse.Namespace) -> list[str]:
    p = []
    if args.max_new_tokens < 1:
        p.append(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.append(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        p.append(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        p.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.num_samples < 1:
        p.append(f"--num-samples must be at least 1, got {args.num_samples}")
    return p


def _check_device(name: str, torch) -> None:
    """Refuse a device this machine does not have before loading anything."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here (torch "
                          f"{torch.__version__}, no usable GPU); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                          "CUDA device(s)")


def run(args: argparse.Namespace) -> int:
    problems = _problems(args)
    if problems:
        raise ConfigError("; ".join(problems))
    with stdout_to_stderr(deepspeed=True):
        import torch
        from zeroforge.model import Sampling
        from zeroforge.pipeline.results.sample import sample

    _check_device(args.device, torch)

    greedy = args.temperature == 0
    sampling = Sampling(do_sample=not greedy, temperature=args.temperature or 1.0,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    out = sample(args.checkpoint, args.prompt, args.max_new_tokens, args.num_samples, sampling,
                 args.tokenizer, args.device)
    log.info("%s (step %d, %s, tokenizer %s): %d sample(s), %s", out.info.tag_dir,
             out.info.step, out.info.family.name, out.tokenizer, args.num_samples,
             "greedy" if greedy else f"temperature {args.temperature}")
    for i, (ids, text) in enumerate(zip(out.outputs, out.texts, strict=True)):
        if args.json:
            print(json.dumps({"sample": i, "prompt": args.prompt, "completion": text,
                              "tokens": ids, "step": out.info.step}))
            continue
        if i:
            print("-" * 40)
        print(args.prompt + text if out.task.echo_prompt else text)
    return EXIT_OK
