"""Optimizer-step time of the DeepSpeed engine (ZeRO-1, ZeRO-2; one rank) vs. a plain PyTorch
AdamW loop, same model, same batch, same process (not a test).

Every variant runs forward + backward + gradient clipping + AdamW step with the run config's
optimizer settings and weight-decay groups. DeepSpeed is built exactly as ``zeroforge train``
builds it (pipeline/engine.py: merged ds_config.json, torch AdamW on CPU); the lr is set every
step as the training loop does. Variants are interleaved (a few steps each, many rounds) after a
warmup; each reports the median and min over all its timed steps. ``ratio`` = engine median /
the faster plain loop's median (target <= 1.10).

One rank still needs a process group: the script sets MASTER_ADDR/PORT, RANK=0, WORLD_SIZE=1
for itself (gloo on CPU, NCCL on GPU).

    python benchmarks/train_step.py                          # gpt2-tiny, seq 64, batch 8
    python benchmarks/train_step.py --preset gpt2-mini --seq 128 --reps 7
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from zeroforge.model import GPT2, GPT2Config
from zeroforge.pipeline.config import build_run_config
from zeroforge.pipeline.training.optim import lr_at, param_groups, set_lr


def _init_process_group() -> None:
    from zeroforge.pipeline.dist import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def plain_step(model: GPT2, opt: torch.optim.Optimizer, clip: float, x: torch.Tensor,
               y: torch.Tensor, step: int, optim_cfg: object, max_steps: int) -> None:
    set_lr(opt, lr_at(step, optim_cfg, max_steps))
    loss = model(x, targets=y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def engine_step(engine: object, x: torch.Tensor, y: torch.Tensor, step: int, optim_cfg: object,
                max_steps: int) -> None:
    set_lr(engine.optimizer, lr_at(step, optim_cfg, max_steps))  # type: ignore[attr-defined]
    loss = engine(x, y)  # type: ignore[operator]
    engine.backward(loss)  # type: ignore[attr-defined]
    engine.step()  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-tiny", help="GPT2Config preset")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    ap.add_argument("--reps", type=int, default=20, help="interleaved repetitions")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    args = ap.parse_args()

    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _init_process_group()
    from zeroforge.pipeline.training.engine import build_engine, detect_device

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = build_run_config({
        "data": {"store": "unused", "seq_len": args.seq},
        "model": {"family": "gpt2", "preset": args.preset},
        "train": {"micro_batch_size": args.batch, "precision": "fp32",
                  "max_steps": 10_000},
    })
    optim, max_steps = cfg.optim, cfg.train.max_steps
    torch.manual_seed(0)
    base = GPT2(GPT2Config.preset(args.preset, n_positions=max(args.seq, 256))).to(device)
    g = torch.Generator().manual_seed(1)
    vocab = base.config.vocab_size
    x = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
    y = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)

    steps: dict[str, Callable[[int], None]] = {}
    for name, foreach in (("plain AdamW", None), ("plain AdamW foreach", True)):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                                betas=tuple(optim.betas), eps=optim.eps, foreach=foreach)
        steps[name] = (lambda s, m=model, o=opt: plain_step(m, o, optim.grad_clip, x, y, s,
                                                            optim, max_steps))
    for stage in (1, 2):
        cfg.deepspeed = {"zero_optimization": {"stage": stage}}
        engine = build_engine(copy.deepcopy(base), cfg.ds_config(1, detect_device()), optim)
        steps[f"DeepSpeed ZeRO-{stage}"] = (lambda s, e=engine: engine_step(e, x, y, s, optim,
                                                                             max_steps))

    def timed(fn: Callable[[int], None], start: int, n: int) -> list[float]:
        """Seconds of each of ``n`` steps (synchronized per step on GPU)."""
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            fn(start + i)
            if device == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return out

    for fn in steps.values():
        timed(fn, 0, args.warmup)
    per_step: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(args.reps):  # interleaved, so machine load drifts hit every variant
        for k, fn in steps.items():
            per_step[k] += timed(fn, args.warmup + rep * args.steps, args.steps)

    # Median of every timed step: robust to the bursts of other work on a shared machine.
    med = {k: statistics.median(v) for k, v in per_step.items()}
    plain = min(med["plain AdamW"], med["plain AdamW foreach"])
    best_plain = min(min(per_step["plain AdamW"]), min(per_step["plain AdamW foreach"]))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device={device} ({platform.processor() or platform.machine()}), "
          f"threads={torch.get_num_threads()}, torch={torch.__version__}, "
          f"load average at end {load:.1f}")
    print(f"model {args.preset} ({base.num_params() / 1e6:.2f}M params), batch {args.batch} x "
          f"seq {args.seq}, fp32; {args.reps} interleaved rounds x {args.steps} steps after "
          f"{args.warmup} warmup steps")
    print(f"{'variant':<22} {'median ms/step':>15} {'min':>8} {'max':>8} {'median/plain':>13} "
          f"{'min/plain':>10}")
    for k, v in per_step.items():
        print(f"{k:<22} {med[k] * 1e3:>15.1f} {min(v) * 1e3:>8.1f} {max(v) * 1e3:>8.1f} "
              f"{med[k] / plain:>12.3f}x {min(v) / best_plain:>9.3f}x")
    for stage in (1, 2):
        ratio = med[f"DeepSpeed ZeRO-{stage}"] / plain
        verdict = "ok" if ratio <= 1.10 else "ABOVE TARGET"
        print(f"ratio ZeRO-{stage}/plain (medians) = {ratio:.3f} (target <= 1.10: {verdict})")


if __name__ == "__main__":
    main()
