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
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Evaluate a committed checkpoint; print its metrics as one JSON line on stdout.

    One process loads the weights directly (pipeline/weights.py: any ZeRO stage, any training
    world size, no DeepSpeed engine); under a multi-rank launcher every rank loads them through
    DeepSpeed instead and the batches are shared out.
    """
    from pathlib import Path

    from pipeline import checkpoint as ckpt
    from pipeline.config import build_run_config, load_run_config
    from pipeline.dist import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, discover, init_distributed
    from pipeline.weights import deepspeed_logs_to_stderr, read_checkpoint, resolve_checkpoint

    def fail(msg: str, code: int) -> int:
        print(f"zeroforge eval: {msg}", file=sys.stderr)
        return code

    deepspeed_logs_to_stderr()

    if args.config is None and args.checkpoint is None:
        return fail("give --config (the run's newest checkpoint) or --checkpoint", EXIT_CONFIG)
    try:
        cfg = load_run_config(args.config, args.overrides) if args.config else None
    except ValueError as e:
        return fail(str(e), EXIT_CONFIG)
    try:
        if args.checkpoint is not None:
            where = Path(args.checkpoint)
            if cfg is not None and not where.exists():
                where = cfg.checkpoint.path(Path(cfg.run_dir)) / args.checkpoint
            tag_dir = resolve_checkpoint(where)
        else:
            assert cfg is not None
            root = cfg.checkpoint.path(Path(cfg.run_dir))
            tag_dir = resolve_checkpoint(root) if args.tag is None else root / args.tag
            if not (tag_dir / ckpt.MARKER).is_file():
                return fail(f"--tag {args.tag}: not a committed checkpoint in {root}",
                            EXIT_FAILED)
        if cfg is None:
            from pipeline.config import apply_overrides

            info, _ = read_checkpoint(tag_dir, weights=False)
            try:
                cfg = build_run_config(apply_overrides(info.run_config, args.overrides))
            except ValueError as e:
                return fail(f"{tag_dir} (saved run config): {e}", EXIT_CONFIG)
    except ValueError as e:
        return fail(str(e), EXIT_FAILED)
    d = discover()
    try:
        if d.world_size == 1:
            model, batches, step, device = _load_single(cfg, tag_dir, args.split)
        else:
            device = init_distributed(d)
            model, batches, step = _load_for_eval(cfg, d, device, tag_dir.parent, tag_dir.name,
                                                  args.split)
        result = evaluate(model, batches, cfg.model.task, device)
    except (ValueError, ckpt.ResumeError) as e:
        return fail(str(e), EXIT_FAILED)
    if args.split != "val":
        result = {k.replace("val/", f"{args.split}/"): v for k, v in result.items()}
    if d.rank == 0:
        out = {"step": step, "tag": tag_dir.name, "checkpoint": str(tag_dir),
               "split": args.split, **result}
        if not args.json:
            s = args.split
            print(f"{tag_dir} (step {step}): {s} loss {result[f'{s}/loss']:.4f}, "
                  f"ppl {result[f'{s}/ppl']:.2f} over {result[f'{s}/tokens']} tokens",
                  file=sys.stderr)
        print(json.dumps(out), flush=True)
    return EXIT_OK


def split_batches(cfg: Any, task: str, split: str, batch_size: int, rank: int, world: int,
                  sentinel_ids: Any = None, pad_id: int | None = None) -> list[dict]:
    """``val_batches`` for any split: the same fixed, evenly spread windows and masks."""
    from pipeline import data

    if split == "val":
        return data.val_batches(cfg, task, batch_size, rank, world, sentinel_ids, pad_id)
    # Same selection as data.val_batches, on another split (its private helpers, one home).
    ex = data._Examples(cfg, task, split, sentinel_ids, pad_id)
    chosen = data._val_selection(ex, cfg.val_windows, quiet=rank != 0)
    usable = len(chosen) - len(chosen) % world
    mine = list(range(rank, usable, world))
    out = []
    for a in range(0, len(mine), batch_size):
        pos = mine[a: a + batch_size]
        out.append(ex.batch([chosen[p][0] for p in pos], [chosen[p][1] for p in pos], pos,
                            data._VAL_SEED, data._VAL_STREAM))
    return out


def _batches(cfg: Any, model_config: Any, split: str, rank: int, world: int) -> list[dict]:
    from pipeline.train import sentinels_and_pad

    sentinels, pad = sentinels_and_pad(model_config)
    return split_batches(cfg.data, cfg.model.task, split,
                         cfg.train.eval_batch_size or cfg.train.micro_batch_size, rank, world,
                         sentinel_ids=sentinels, pad_id=pad)


def _load_single(cfg: Any, tag_dir: Any, split: str) -> tuple[Any, list, int, str]:
    """The checkpoint's weights in this process (no DeepSpeed engine), and the batches."""
    import torch

    from pipeline.train import store_info
    from pipeline.weights import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, info = load_model(tag_dir, device)
    wanted = cfg.model_config().to_dict()
    if info.model_config.to_dict() != wanted:
        changed = sorted(k for k in wanted if info.model_config.to_dict().get(k) != wanted[k])
        raise ValueError(f"{tag_dir}: the checkpoint's model differs from the config's "
                         f"(model.{', model.'.join(changed)})")
    _, _, tokenizer = store_info(cfg)
    if info.tokenizer is not None and info.tokenizer != tokenizer:
        raise ValueError(f"data.store: tokenizer {tokenizer!r}, but {tag_dir} was trained with "
                         f"{info.tokenizer!r}")
    return model, _batches(cfg, info.model_config, split, 0, 1), info.step, device


def _load_for_eval(cfg: Any, d: Any, device: str, root: Any, tag: str, split: str = "val"
                   ) -> tuple[Any, list, int]:
    from model import GPT2, EncoderDecoder, GPT2Config
    from pipeline import checkpoint as ckpt
    from pipeline.engine import build_engine, merge_ds_config
    from pipeline.train import store_info

    fingerprint, _, _ = store_info(cfg)
    model_config = cfg.model_config()
    model = GPT2(model_config) if isinstance(model_config, GPT2Config) else \
        EncoderDecoder(model_config)
    engine = build_engine(model, merge_ds_config(cfg, d.world_size), cfg.optim)
    client = ckpt.load(engine, root, tag, d.rank, module_only=True)
    ckpt.check_compatible(client, model_config.to_dict(), fingerprint, str(root / tag))
    return engine, _batches(cfg, model_config, split, d.rank, d.world_size), \
        int(client.get("step", 0))
