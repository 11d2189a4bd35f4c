"""What checking a checkpoint against its manifest costs, as a share of loading it (not a test).

A checkpoint of a real DeepSpeed engine (one rank, the ZeRO stage given) is saved through
training/checkpoint.py (manifest and commit marker included), then loaded the two ways
zeroforge loads checkpoints, each timed against its verification in the same run:

    resume    checkpoint.load, i.e. DeepSpeed's load_checkpoint of model and optimizer, with
              the manifest check (what a resume does: beside the load at ZeRO 0-2, before it
              at ZeRO-3) and without it (check=False); extra = with - without. For
              comparison, the check alone (checkpoint.verify_on_ranks) as a share of the
              load: what it adds run before the load instead of beside it.
    results   verify: checkpoint.verify_tag (every file)
              load:   results.weights.load_model (eval, sample, export, init_from) minus its
                      own verification, measured separately; these check before they read

The rounds are interleaved (--reps); the fastest of each is reported, since the machine may
be shared. The resume ratio is the median over rounds of each round's paired difference, the
two loads of a round back to back and in alternating order: two separate minima of loads this
noisy (on a shared machine) differ by more than the check costs. The files are in the page cache (one untimed load first): the strict case, where
verification is pure extra work. From a cold disk the bytes a verification reads are the ones
the load then finds in memory; this VM's virtual disk (cached by its host) gave no stable cold
figures, so none are printed. ``ratio`` = extra time / load time (target <= 0.10).

    python benchmarks/checkpoint_verify.py                        # GPT-2 124M, ZeRO-1
    python benchmarks/checkpoint_verify.py --preset gpt2-mini --stage 0 --reps 5
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from zeroforge.model import GPT2, GPT2Config
from zeroforge.pipeline.config import build_run_config
from zeroforge.pipeline.training import checkpoint as ckpt


def _init_process_group() -> None:
    from zeroforge.pipeline.dist import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2", help="GPT2Config preset (default gpt2: 124M)")
    ap.add_argument("--stage", type=int, default=1, choices=(0, 1, 2, 3), help="ZeRO stage")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--dir", default=None, help="where to save (default: a temp dir)")
    args = ap.parse_args()

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _init_process_group()
    from zeroforge.pipeline.results.weights import load_model
    from zeroforge.pipeline.training.engine import build_engine, detect_device

    cfg = build_run_config({
        "data": {"store": "unused"}, "model": {"family": "gpt2", "preset": args.preset},
        "deepspeed": {"zero_optimization": {"stage": args.stage}},
        "train": {"micro_batch_size": 1, "precision": "fp32"}})
    model = GPT2(GPT2Config.preset(args.preset))
    engine = build_engine(model, cfg.ds_config(1, detect_device()), cfg.optim)
    # One step, so that the optimizer holds its moments as after real training.
    x = torch.randint(0, 50257, (1, 32))
    engine.backward(engine(x, x))
    engine.step()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        client = {"model_config": model.config.to_dict(), "tokenizer": "gpt2",
                  "run_config": cfg.to_dict()}
        t_save = _timed(lambda: ckpt.save(engine, root, 1, client, keep_last=1, rank=0))
        tag = ckpt.tag_for(1)
        size = sum(f.stat().st_size for f in (root / tag).iterdir())
        tag_dir = root / tag
        runs: dict[str, list[float]] = {}

        def record(key: str, seconds: float) -> None:
            runs.setdefault(key, []).append(seconds)

        ckpt.load(engine, root, tag, 0)  # DeepSpeed's code paths warmed once
        extra: list[float] = []  # per round: (checked - unchecked) / unchecked
        for r in range(args.reps):
            record("resume verify", _timed(lambda: ckpt.verify_on_ranks(tag_dir, 0)))
            pair = {}
            for checked in ((False, True) if r % 2 == 0 else (True, False)):
                pair[checked] = _timed(lambda c=checked: ckpt.load(engine, root, tag, 0, check=c))
            record("resume load", pair[False])
            record("resume checked", pair[True])
            extra.append((pair[True] - pair[False]) / pair[False])
            record("results verify", _timed(lambda: ckpt.verify_tag(tag_dir)))
            record("results total", _timed(lambda: load_model(tag_dir)))
    best = {k: min(v) for k, v in runs.items()}
    results_load = best["results total"] - best["results verify"]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}; {args.preset} ZeRO-{args.stage}, checkpoint "
          f"{size / 1e9:.2f} GB (saved in {t_save:.1f}s, manifest included), reps {args.reps}")
    print(f"verify  {size / 1e9 / best['results verify']:.2f} GB/s")
    load, checked = best["resume load"], best["resume checked"]
    where = "before" if args.stage == 3 else "beside"
    print(f"resume  load {load:.3f}s  with the check {where} it {checked:.3f}s  "
          f"ratio {statistics.median(extra):.3f} (median of the rounds)  (the check alone {best['resume verify']:.3f}s: "
          f"{best['resume verify'] / load:.3f} of the load if run before it)")
    print(f"results load {results_load:.3f}s  verify {best['results verify']:.3f}s  "
          f"ratio {best['results verify'] / results_load:.3f}")


if __name__ == "__main__":
    main()
