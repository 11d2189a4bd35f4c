"""What checking a checkpoint against its manifest costs, as a share of loading it (not a test).

A checkpoint of a real DeepSpeed engine (one rank, the ZeRO stage given) is saved through
training/checkpoint.py (manifest and commit marker included), then loaded the two ways
zeroforge loads checkpoints, each timed against its verification in the same run:

    resume    verify: checkpoint.verify_on_ranks (what choose_resume runs before a resume)
              load:   checkpoint.load, i.e. DeepSpeed's load_checkpoint of model and optimizer
    results   verify: checkpoint.verify_tag (every file)
              load:   results.weights.load_model (eval, sample, export, init_from) minus its
                      own verification, measured separately

The page cache is warm for both (one untimed load first): the strict case for the ratio, since
from a cold disk the bytes a verification reads are the ones the load then finds in memory.
Reported: the fastest of --reps interleaved rounds (the machine may be shared); ``ratio`` = verify / load (target <= 0.10).

    python benchmarks/checkpoint_verify.py                        # GPT-2 124M, ZeRO-1
    python benchmarks/checkpoint_verify.py --preset gpt2-mini --stage 0 --reps 5
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
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
        runs: dict[str, list[float]] = {k: [] for k in
                                        ("resume_verify", "resume_load", "results_verify",
                                         "results_total")}
        ckpt.load(engine, root, tag, 0)  # warm the page cache (and DeepSpeed's code paths)
        for _ in range(args.reps):
            runs["resume_verify"].append(_timed(lambda: ckpt.verify_on_ranks(root / tag, 0)))
            runs["resume_load"].append(_timed(lambda: ckpt.load(engine, root, tag, 0)))
            runs["results_verify"].append(_timed(lambda: ckpt.verify_tag(root / tag)))
            runs["results_total"].append(_timed(lambda: load_model(root / tag)))
    med = {k: min(v) for k, v in runs.items()}
    results_load = med["results_total"] - med["results_verify"]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}; {args.preset} ZeRO-{args.stage}, checkpoint "
          f"{size / 1e9:.2f} GB (saved in {t_save:.1f}s, manifest included), reps {args.reps}")
    print(f"verify  {size / 1e9 / med['results_verify']:.2f} GB/s")
    print(f"resume  load {med['resume_load']:.3f}s  verify {med['resume_verify']:.3f}s  "
          f"ratio {med['resume_verify'] / med['resume_load']:.3f}")
    print(f"results load {results_load:.3f}s  verify {med['results_verify']:.3f}s  "
          f"ratio {med['results_verify'] / results_load:.3f}")


if __name__ == "__main__":
    main()
