"""Validation loss / perplexity over the fixed val windows, and ``zeroforge eval``.

``evaluate`` sums token losses and token counts (float64) over this rank's share of the fixed
val batches and all-reduces both, so the result is a token-weighted mean over the whole val set,
identical on every rank and on every call.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

IGNORE_INDEX = -100


def _sum_loss(module: Any, batch: dict, task: str, device: str) -> tuple[float, int]:
    import torch.nn.functional as F

    if task == "gpt":
        logits = module(batch["input_ids"].to(device))
        targets = batch["targets"].to(device)
    else:
        logits = module(batch["input_ids"].to(device),
                        decoder_input_ids=batch["decoder_input_ids"].to(device))
        targets = batch["labels"].to(device)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    count = int((targets != IGNORE_INDEX).sum())
    return float(loss.double()), count


def evaluate(engine: Any, batches: list[dict], task: str, device: str) -> dict[str, float]:
    """``{"val/loss", "val/ppl", "val/tokens"}`` over every rank's batches (call on all ranks)."""
    import torch
    import torch.distributed as dist

    was_training = engine.training
    engine.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                s, n = _sum_loss(engine, batch, task, device)
                total += s
                count += n
    finally:
        engine.train(was_training)
    sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    total, count = float(sums[0]), int(sums[1])
    if count == 0:
        raise ValueError("data.val_windows: no validation tokens to evaluate on")
    loss = total / count
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 700.0)), "val/tokens": count}


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run's recipe (YAML path or name)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument("--tag", default=None,
                        help="checkpoint tag (default: newest committed, e.g. step_00000020)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Load a committed checkpoint of the run and print its val metrics as one JSON line."""
    from pathlib import Path

    from pipeline import checkpoint as ckpt
    from pipeline.config import load_run_config
    from pipeline.dist import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, discover, init_distributed

    try:
        cfg = load_run_config(args.config, args.overrides)
    except ValueError as e:
        print(f"zeroforge eval: {e}", file=sys.stderr)
        return EXIT_CONFIG
    root = cfg.checkpoint.path(Path(cfg.run_dir))
    tag = args.tag
    if tag is None:
        latest = ckpt.latest_committed(root)
        if latest is None:
            print(f"zeroforge eval: no committed checkpoint in {root}", file=sys.stderr)
            return EXIT_FAILED
        tag = latest[1]
    elif not (root / tag / ckpt.MARKER).is_file():
        print(f"zeroforge eval: --tag {tag}: not a committed checkpoint in {root}",
              file=sys.stderr)
        return EXIT_FAILED
    d = discover()
    device = init_distributed(d)
    engine, val, step = _load_for_eval(cfg, d, device, root, tag)
    result = evaluate(engine, val, cfg.model.task, device)
    if d.rank == 0:
        print(json.dumps({"step": step, "tag": tag, **result}))
    return EXIT_OK


def _load_for_eval(cfg: Any, d: Any, device: str, root: Any, tag: str) -> tuple[Any, list, int]:
    from model import GPT2, EncoderDecoder, GPT2Config
    from pipeline import checkpoint as ckpt
    from pipeline.data import val_batches
    from pipeline.engine import build_engine, merge_ds_config
    from pipeline.train import sentinels_and_pad, store_info

    fingerprint, _, _ = store_info(cfg)
    model_config = cfg.model_config()
    model = GPT2(model_config) if isinstance(model_config, GPT2Config) else \
        EncoderDecoder(model_config)
    engine = build_engine(model, merge_ds_config(cfg, d.world_size), cfg.optim)
    client = ckpt.load(engine, root, tag, d.rank, module_only=True)
    ckpt.check_compatible(client, model_config.to_dict(), fingerprint, str(root / tag))
    sentinels, pad = sentinels_and_pad(model_config)
    val = val_batches(cfg.data, cfg.model.task,
                      cfg.train.eval_batch_size or cfg.train.micro_batch_size, d.rank,
                      d.world_size, sentinel_ids=sentinels, pad_id=pad)
    return engine, val, int(client.get("step", 0))
