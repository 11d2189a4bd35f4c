"""``zeroforge sample``: generate text from a checkpoint, in one process, on CPU by default.

    zeroforge sample --checkpoint runs/gpt2-tiny-cpu --prompt "ROMEO:" --max-new-tokens 64
    zeroforge sample --checkpoint runs/t5-tiny-cpu --prompt "To be, or <extra_id_0> to be"

GPT-2 models continue the prompt. Encoder-decoder models read the prompt as encoder input:
``<extra_id_K>`` in the prompt stands for sentinel K (the span-corruption masks the model was
trained to fill); a prompt without one gets ``<extra_id_0>`` appended, so the model fills in what
follows the text. Sentinels in the output are printed back as ``<extra_id_K>``.

The weights are loaded directly (pipeline/weights.py), so no launcher or DeepSpeed engine is
involved; the tokenizer is the one the checkpoint was trained with.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Any

log = logging.getLogger("zeroforge.sample")

SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")


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


def _check_args(args: argparse.Namespace) -> list[str]:
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


def encode_prompt(text: str, enc: Any, model_config: Any, encoder_decoder: bool) -> list[int]:
    """Prompt token ids. Literal special-token text stays text, as in the token store."""
    if not encoder_decoder:
        ids = enc.encode_ordinary(text)
        return ids or [enc.eot_token]
    ids: list[int] = []
    pos = 0
    for m in SENTINEL_RE.finditer(text):
        ids += enc.encode_ordinary(text[pos:m.start()])
        k = int(m.group(1))
        if k >= model_config.n_sentinels:
            raise ValueError(f"--prompt: {m.group(0)} but the model has "
                             f"{model_config.n_sentinels} sentinels")
        ids.append(model_config.vocab_size + k)
        pos = m.end()
    ids += enc.encode_ordinary(text[pos:])
    if not any(model_config.vocab_size <= t for t in ids):
        ids.append(model_config.vocab_size)  # <extra_id_0>: "what comes next"
    return ids


def decode(ids: list[int], enc: Any, model_config: Any) -> str:
    """Text of generated ids: stops at EOS; sentinels as ``<extra_id_K>``."""
    eos = model_config.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    parts: list[str] = []
    run: list[int] = []
    for t in ids:
        if t < enc.n_vocab:
            run.append(t)
            continue
        parts.append(enc.decode(run))
        run = []
        parts.append(f"<extra_id_{t - model_config.vocab_size}>")
    parts.append(enc.decode(run))
    return "".join(parts)


def run(args: argparse.Namespace) -> int:
    from data_prep.tokenize import TokenizerError, get_encoding
    from model import EncDecConfig
    from pipeline.dist import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
    from pipeline.weights import deepspeed_logs_to_stderr, load_model

    deepspeed_logs_to_stderr()
    problems = _check_args(args)
    if problems:
        print("zeroforge sample: " + "; ".join(problems), file=sys.stderr)
        return EXIT_CONFIG
    try:
        model, info = load_model(args.checkpoint, args.device)
        tokenizer = args.tokenizer or info.tokenizer
        if tokenizer is None:
            raise ValueError(f"{info.tag_dir}: the checkpoint does not record its tokenizer and "
                             "its token store is gone; pass --tokenizer NAME")
        enc = get_encoding(tokenizer)
        encdec = isinstance(info.model_config, EncDecConfig)
        prompt = encode_prompt(args.prompt, enc, info.model_config, encdec)
        greedy = args.temperature == 0
        outs = model.generate([prompt] * args.num_samples, args.max_new_tokens,
                              do_sample=not greedy, temperature=args.temperature or 1.0,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except (ValueError, TokenizerError) as e:
        print(f"zeroforge sample: {e}", file=sys.stderr)
        return EXIT_FAILED
    log.info("%s (step %d, %s, tokenizer %s): %d sample(s), %s", info.tag_dir, info.step,
             info.family, tokenizer, args.num_samples,
             "greedy" if greedy else f"temperature {args.temperature}")
    for i, ids in enumerate(outs):
        completion = decode(ids, enc, info.model_config)
        if args.json:
            print(json.dumps({"sample": i, "prompt": args.prompt, "completion": completion,
                              "tokens": ids, "step": info.step}))
            continue
        if i:
            print("-" * 40)
        # A GPT sample reads on from the prompt; an encoder-decoder output stands alone.
        print(completion if encdec else args.prompt + completion)
    sys.stdout.flush()
    return EXIT_OK
