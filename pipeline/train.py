"""``zeroforge train``: one DeepSpeed training run (setup -> resume -> fit), any launcher.

    zeroforge train --config gpt2-tiny-cpu train.max_steps=50          # one process
    zeroforge train --config gpt2-tiny-cpu --nproc 2                   # via the deepspeed launcher
    deepspeed --num_gpus 2 --module pipeline.train --config gpt2-tiny-cpu
    torchrun --nproc_per_node 2 -m pipeline.train --config gpt2-tiny-cpu

Exit codes are in pipeline/dist.py (0 done, 1 failed, 2 bad config, 75 preempted after a
checkpoint). Debug hooks for tests (environment variables, documented in docs/training.md):

    ZEROFORGE_DEBUG_NAN_STEPS=3,4        the loss of these steps is NaN on the last rank
    ZEROFORGE_DEBUG_KILL_AFTER_STEP=13   SIGKILL the process group after step 13 is logged
    ZEROFORGE_DEBUG_KILL_IN_SAVE=8       SIGKILL it in the middle of checkpoint 8 (checkpoint.py)
    ZEROFORGE_DEBUG_CHECKSUM=1           log every rank's parameter checksum in metrics.jsonl
    ZEROFORGE_DEBUG_SAMPLE_IDS=1         log the sample ids each step consumed (all ranks)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, dump_yaml, load_run_config
from pipeline.dist import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PREEMPTED,
    PREEMPT_SIGNALS,
    DistEnv,
    PreemptionFlag,
    discover,
    free_port,
)

log = logging.getLogger("zeroforge.train")

DEBUG_NAN_STEPS = "ZEROFORGE_DEBUG_NAN_STEPS"
DEBUG_KILL_AFTER_STEP = "ZEROFORGE_DEBUG_KILL_AFTER_STEP"
DEBUG_CHECKSUM = "ZEROFORGE_DEBUG_CHECKSUM"
DEBUG_SAMPLE_IDS = "ZEROFORGE_DEBUG_SAMPLE_IDS"


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps); the message names the step."""


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="run recipe: a YAML path or a name in configs/ (e.g. gpt2-tiny-cpu)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.max_steps=50 "
                             "deepspeed.zero_optimization.stage=2")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved run config and merged DeepSpeed config, exit")
    parser.add_argument("--nproc", type=int, default=1,
                        help="ranks on this machine (started through the launcher)")
    parser.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed",
                        help="launcher used with --nproc > 1")
    # The deepspeed launcher appends --local_rank=N; rank discovery reads the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_run_config(args.config, args.overrides)
        if args.print_config:
            return print_config(cfg, max(args.nproc, discover().world_size))
    except ValueError as e:
        print(f"zeroforge train: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.nproc < 1:
        print("zeroforge train: --nproc must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    if args.nproc > 1 and discover().source == "single":
        return launch(args)
    return train(cfg)


def print_config(cfg: RunConfig, world_size: int) -> int:
    from pipeline.engine import merge_ds_config

    ds = merge_ds_config(cfg, world_size)
    print("# run config (resolved)")
    print(dump_yaml(cfg), end="")
    print(f"# DeepSpeed config (merged, world size {world_size})")
    print(json.dumps(ds, indent=2))
    return EXIT_OK


def launch(args: argparse.Namespace) -> int:
    """Start ``args.nproc`` ranks of this module through the launcher and wait for them.

    SIGTERM/SIGUSR1 sent to this process are forwarded to the ranks themselves (the launchers
    would kill them at once), so a preemption still checkpoints and exits with 75.
    """
    passthrough = ["--config", args.config, *args.overrides]
    port = str(free_port())
    if args.launcher == "deepspeed":
        exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
        cmd = [exe, "--num_gpus", str(args.nproc), "--master_port", port, "--module",
               "pipeline.train", *passthrough]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(args.nproc), "--master_port", port, "-m", "pipeline.train", *passthrough]
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd)

    def forward(signum: int, frame: object) -> None:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            cmd = " ".join(child.cmdline())
            # The ranks, not the launcher processes (whose command lines also name the module).
            if "pipeline.train" in cmd and "deepspeed" not in cmd and "torch.distributed" not in cmd:
                child.send_signal(signum)

    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, forward)
    return proc.wait()


# ----------------------------------------------------------------------------- state


@dataclass
class LoopState:
    """Everything the loop carries between steps that a resume must restore."""

    step: int = 0  # optimizer steps done (skipped ones included)
    samples: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class Run:
    """What ``setup`` built; ``fit`` only reads it (plus the mutable ``state``)."""

    cfg: RunConfig
    dist: DistEnv
    device: str
    run_dir: Path
    ckpt_dir: Path
    engine: Any
    model_config: Any
    ds_config: dict[str, Any]
    loader: Any
    val: list[dict]
    tracker: Any
    state: LoopState
    fingerprint: str
    n_params: int
    flops_per_step: float
    tokenizer: str
    metrics: Any = None  # MetricsWriter on rank 0
    progress: Any = None  # Progress on rank 0


def _setup_logging(rank: int) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S", level=logging.INFO)
    if rank != 0:
        # Rank-0-only logs: other ranks speak up for warnings and errors.
        root.setLevel(logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _task(cfg: RunConfig) -> str:
    return cfg.model.task


def sentinels_and_pad(model_config: Any) -> tuple[list[int] | None, int | None]:
    from model import EncDecConfig, sentinel_ids

    if isinstance(model_config, EncDecConfig):
        return sentinel_ids(model_config), model_config.pad_token_id
    return None, None


def _flops_per_step(model_config: Any, loader: Any, cfg: RunConfig) -> float:
    from model import EncDecConfig, encdec_flops_per_token, gpt2_flops_per_token

    g = loader.global_batch
    if isinstance(model_config, EncDecConfig):
        enc, dec = loader.examples.enc_len, loader.examples.dec_len
        return encdec_flops_per_token(model_config, enc, dec) * g * dec
    return gpt2_flops_per_token(model_config, cfg.data.seq_len) * g * cfg.data.seq_len


def store_info(cfg: RunConfig) -> tuple[str, int, str]:
    """(fingerprint, vocab size, tokenizer) of the data; a mixture's fingerprints are joined."""
    from data_prep.store import TokenStore

    stores = [TokenStore.open(p) for p, _ in cfg.data.sources()]
    fp = stores[0].fingerprint if len(stores) == 1 else "+".join(s.fingerprint for s in stores)
    return fp, stores[0].vocab_size, stores[0].tokenizer


def _all_gather_strings(value: str, world: int) -> list[str]:
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return [str(x) for x in out]


def setup(cfg: RunConfig, d: DistEnv, device: str) -> Run:
    """Build model, engine, data, tracker; resume from the newest committed checkpoint."""
    from model import GPT2, EncoderDecoder, GPT2Config
    from pipeline import checkpoint as ckpt
    from pipeline.data import TrainLoader, val_batches
    from pipeline.dist import seed_everything
    from pipeline.elastic import plan_resume
    from pipeline.engine import build_engine, merge_ds_config
    from pipeline.tracking import make_tracker, run_params

    run_dir = Path(cfg.run_dir)
    ckpt_dir = cfg.checkpoint.path(run_dir)
    fingerprint, vocab, tokenizer = store_info(cfg)
    model_config = cfg.model_config()
    if model_config.vocab_size < vocab:
        raise ValueError(f"model.vocab_size ({model_config.vocab_size}) is smaller than the "
                         f"token store's vocabulary ({vocab}, tokenizer {tokenizer})")
    # A checkpoint from another world size: keep its global batch, load it re-partitioned.
    plan = plan_resume(ckpt_dir, cfg.train.micro_batch_size, cfg.train.grad_accum,
                       d.world_size, d.rank)
    cfg = plan.run_config(cfg)
    ds = plan.ds_config(merge_ds_config(cfg, d.world_size))

    # Same seed on every rank: identical initial weights (DeepSpeed also broadcasts them).
    seed_everything(cfg.train.seed)
    model = GPT2(model_config) if isinstance(model_config, GPT2Config) else \
        EncoderDecoder(model_config)
    n_params = sum(p.numel() for p in model.parameters())
    latest = ckpt.latest_committed(ckpt_dir)
    if cfg.init_from and latest is None:
        # Fine-tuning / continued pretraining: pretrained weights, fresh optimizer, step 0.
        # Loaded into the plain module before DeepSpeed wraps (and, at ZeRO-3, partitions) it.
        from pipeline.weights import init_from

        source = init_from(model, cfg.init_from, tokenizer)
        if d.rank == 0:
            log.info("init_from: %s; fresh optimizer, starting at step 0", source)
    engine = build_engine(model, ds, cfg.optim, compile_model=cfg.train.compile)
    # Dropout and other randomness differ per rank from here on.
    seed_everything(cfg.train.seed + 1000 * d.rank + 1)

    state = LoopState()
    client: dict[str, Any] = {}
    if latest is not None:
        step, tag = latest
        if d.rank == 0:
            log.info("resuming from %s", ckpt_dir / tag)
        # Refuse a different model or store before DeepSpeed tries (and fails) to load it.
        ckpt.check_compatible(ckpt.read_marker(ckpt_dir, tag), model_config.to_dict(),
                              fingerprint, str(ckpt_dir / tag))
        client = plan.load(engine, ckpt_dir, tag, d.rank)
        saved = client.get("loop", {})
        state = LoopState(**{k: v for k, v in saved.items() if k in LoopState.__dataclass_fields__})
        if state.step != step:
            raise ckpt.ResumeError(f"{ckpt_dir / tag}: client state says step {state.step}")
        if client.get("config_hash") != cfg.config_hash() and d.rank == 0:
            log.warning("the run config changed since the checkpoint (model and data did not); "
                        "continuing with the new config")
    else:
        partial = ckpt.partial(ckpt_dir)
        if partial and d.rank == 0:
            log.warning("ignoring incomplete checkpoint(s) %s; starting from step 0",
                        [t for _, t in partial])

    sentinels, pad = sentinels_and_pad(model_config)
    task = _task(cfg)
    loader = TrainLoader(cfg.data, task, cfg.train.micro_batch_size, cfg.train.grad_accum,
                         d.rank, d.world_size, cfg.train.seed, sentinel_ids=sentinels,
                         pad_id=pad, state=client.get("data"))
    val = val_batches(cfg.data, task, cfg.train.eval_batch_size or cfg.train.micro_batch_size,
                      d.rank, d.world_size, sentinel_ids=sentinels, pad_id=pad)

    hostnames = _all_gather_strings(socket.gethostname(), d.world_size)
    tracker = make_tracker(cfg.tracking, run_dir, d.rank,
                           resume_run_id=client.get("tracking_run_id"), hostnames=hostnames)
    run = Run(cfg=cfg, dist=d, device=device, run_dir=run_dir, ckpt_dir=ckpt_dir, engine=engine,
              model_config=model_config, ds_config=ds, loader=loader, val=val, tracker=tracker,
              state=state, fingerprint=fingerprint, n_params=n_params,
              flops_per_step=_flops_per_step(model_config, loader, cfg), tokenizer=tokenizer)
    if d.rank == 0:
        from pipeline.metrics import MetricsWriter, Progress

        _write_resolved_configs(run)
        tracker.log_params(run_params(cfg.to_dict(), ds, world_size=d.world_size,
                                      n_params=n_params, store_fingerprint=fingerprint))
        for name in ("config.yaml", "ds_config.json"):
            tracker.log_artifact(run_dir / name, "config")
        run.metrics = MetricsWriter(run_dir, state.step)
        run.progress = Progress(state.step, cfg.train.max_steps)
        log.info("model %s: %.2fM parameters, world size %d, ZeRO stage %d, %s, device %s",
                 cfg.model.family, n_params / 1e6, d.world_size,
                 ds["zero_optimization"]["stage"],
                 "bf16" if ds["bf16"]["enabled"] else "fp16" if ds["fp16"]["enabled"] else "fp32",
                 device)
    return run


def _write_resolved_configs(run: Run) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "config.yaml").write_text(dump_yaml(run.cfg))
    (run.run_dir / "ds_config.json").write_text(json.dumps(run.ds_config, indent=2) + "\n")


# ----------------------------------------------------------------------------- the step


def _debug_steps(var: str) -> set[int]:
    raw = os.environ.get(var, "")
    return {int(x) for x in raw.split(",") if x.strip()}


def forward_loss(engine: Any, batch: dict, task: str, device: str) -> Any:
    """Mean token loss of one micro-batch (the model's own loss path)."""
    if task == "gpt":
        return engine(batch["input_ids"].to(device), batch["targets"].to(device))
    return engine(batch["input_ids"].to(device),
                  decoder_input_ids=batch["decoder_input_ids"].to(device),
                  labels=batch["labels"].to(device))


def train_step(run: Run, batches: Any, preempt: PreemptionFlag, nan_steps: set[int]
               ) -> tuple[float, bool, bool]:
    """One optimizer step over ``grad_accum`` micro-batches.

    Returns (mean loss over micro-batches and ranks, step skipped, stop requested). Every
    micro-batch all-reduces [non-finite flag, stop flag, loss] so all ranks agree on skipping
    and on preemption at the same boundary. A non-finite loss on any rank poisons the step:
    from then on every rank backpropagates NaN, so ZeRO's invalid-gradient-norm check discards
    the update everywhere (parameters and optimizer state unchanged); plain stage 0 drops the
    gradients itself (``skip_step_manually``).
    """
    import torch
    import torch.distributed as dist

    from pipeline.engine import deepspeed_skips_nonfinite, skip_step_manually

    engine, cfg, d = run.engine, run.cfg, run.dist
    step_no = run.state.step + 1
    poisoned = stop = False
    loss_sum = 0.0
    accum = cfg.train.grad_accum
    for micro in range(accum):
        batch = next(batches)
        loss = forward_loss(engine, batch, _task(cfg), run.device)
        if step_no in nan_steps and d.rank == d.world_size - 1:
            loss = loss * float("nan")
        finite = bool(torch.isfinite(loss.detach()))
        flags = torch.tensor([0.0 if finite else 1.0, 1.0 if preempt.requested else 0.0,
                              float(loss.detach()) if finite else 0.0],
                             dtype=torch.float64, device=run.device)
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        poisoned = poisoned or flags[0].item() > 0
        stop = stop or flags[1].item() > 0
        loss_sum += flags[2].item() / d.world_size
        if poisoned:
            loss = loss * float("nan")
        engine.backward(loss)
        if poisoned and micro == accum - 1 and not deepspeed_skips_nonfinite(engine):
            skip_step_manually(engine)
        else:
            engine.step()
    if poisoned and engine.was_step_applied():
        raise TrainingError(f"step {step_no}: DeepSpeed applied an update with non-finite "
                            "gradients (this configuration cannot skip steps)")
    skipped = poisoned or not engine.was_step_applied()  # fp16 loss-scale overflow too
    return (math.nan if poisoned else loss_sum / accum), skipped, stop


def _rank_checksums(run: Run) -> list[float]:
    import torch
    import torch.distributed as dist

    from pipeline.engine import param_checksum

    mine = torch.tensor([param_checksum(run.engine)], dtype=torch.float64, device=run.device)
    out = [torch.zeros_like(mine) for _ in range(run.dist.world_size)]
    dist.all_gather(out, mine)
    return [float(t.item()) for t in out]


# ----------------------------------------------------------------------------- eval / ckpt


def run_eval(run: Run) -> dict[str, float]:
    from pipeline.evaluate import evaluate

    result = evaluate(run.engine, run.val, _task(run.cfg), run.device)
    if run.dist.rank == 0:
        step = run.state.step
        run.tracker.log_metrics(result, step=step)
        run.progress.message(f"eval step {step}: val/loss {result['val/loss']:.4f} "
                             f"val/ppl {result['val/ppl']:.2f}")
        _log_samples(run, step)
    return result


def _log_samples(run: Run, step: int) -> None:
    """A few greedy and top-k continuations of fixed prompts (GPT, ZeRO 0-2, rank 0)."""
    from model import GPT2Config

    cfg = run.cfg.train
    if (not isinstance(run.model_config, GPT2Config) or cfg.sample_tokens == 0
            or not cfg.sample_prompts or run.engine.zero_optimization_stage() == 3
            or run.tracker.run_id is None):
        return
    from data_prep.tokenize import get_encoding

    enc = get_encoding(run.tokenizer)
    prompts = [enc.encode_ordinary(p) for p in cfg.sample_prompts]
    model = run.engine.module
    greedy = model.generate(prompts, cfg.sample_tokens)
    topk = model.generate(prompts, cfg.sample_tokens, do_sample=True, top_k=40, seed=step)
    samples = [{"prompt": p, "greedy": enc.decode(g), "top_k_40": enc.decode(t)}
               for p, g, t in zip(cfg.sample_prompts, greedy, topk, strict=True)]
    run.tracker.log_text(json.dumps(samples, indent=1), f"samples/step_{step:07d}.json")


def save_checkpoint(run: Run) -> None:
    import torch
    import torch.distributed as dist

    from pipeline import checkpoint as ckpt
    from pipeline.engine import local_params_finite

    ok = torch.tensor([1.0 if local_params_finite(run.engine) else 0.0], device=run.device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() < 1:
        raise TrainingError(f"step {run.state.step}: parameters are not finite; refusing to "
                            "write a checkpoint")
    client = {
        "loop": run.state.to_dict(),
        "data": run.loader.state_dict(),
        "tracking_run_id": run.tracker.run_id if run.dist.rank == 0 else None,
        "config_hash": run.cfg.config_hash(),
        "store_fingerprint": run.fingerprint,
        "model_config": run.model_config.to_dict(),
        "run_config": run.cfg.to_dict(),
        "tokenizer": run.tokenizer,  # so sample/export need not find the token store
    }
    # Rank 0's file carries the client state for ZeRO 0-2; broadcast the run id for ZeRO-3,
    # where every rank writes its own copy.
    ids: list[Any] = [client["tracking_run_id"]]
    dist.broadcast_object_list(ids, src=0)
    client["tracking_run_id"] = ids[0]
    t0 = time.time()
    ckpt.save(run.engine, run.ckpt_dir, run.state.step, client, run.cfg.checkpoint.keep_last,
              run.dist.rank)
    if run.dist.rank == 0:
        run.progress.message(f"checkpoint step {run.state.step} committed in "
                             f"{time.time() - t0:.1f}s")


# ----------------------------------------------------------------------------- the loop


def fit(run: Run, preempt: PreemptionFlag) -> int:
    """The step loop; returns the exit code (raises TrainingError on unrecoverable steps)."""
    from model import mfu
    from pipeline.elastic import SampleIdRecorder

    cfg, state, d = run.cfg, run.state, run.dist
    nan_steps = _debug_steps(DEBUG_NAN_STEPS)
    kill_after = _debug_steps(DEBUG_KILL_AFTER_STEP)
    checksums = os.environ.get(DEBUG_CHECKSUM) == "1"
    tokens_per_step = run.loader.tokens_per_global_step
    device_name = None
    if run.device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name()
    from pipeline.optim import lr_at, set_lr

    batches: Any = iter(run.loader)
    if os.environ.get(DEBUG_SAMPLE_IDS) == "1":
        batches = SampleIdRecorder(batches)
    saved_step = state.step
    t_last, steps_since_log = time.time(), 0
    stop_reason = None
    while state.step < cfg.train.max_steps:
        lr = lr_at(state.step, cfg.optim, cfg.train.max_steps)
        set_lr(run.engine.optimizer, lr)
        loss, skipped, stop = train_step(run, batches, preempt, nan_steps)
        state.step += 1
        state.samples += run.loader.global_batch
        state.tokens += tokens_per_step
        steps_since_log += 1
        if skipped:
            state.skipped_steps += 1
            state.nonfinite_in_a_row += 1
            if d.rank == 0:
                log.warning("step %d: non-finite loss or gradients on some rank; step skipped "
                            "(%d in a row, %d in total)", state.step, state.nonfinite_in_a_row,
                            state.skipped_steps)
            if state.nonfinite_in_a_row > cfg.train.max_nonfinite_in_a_row:
                raise TrainingError(
                    f"step {state.step}: {state.nonfinite_in_a_row} non-finite steps in a row "
                    f"(more than train.max_nonfinite_in_a_row={cfg.train.max_nonfinite_in_a_row})")
        else:
            state.nonfinite_in_a_row = 0

        record: dict[str, Any] | None = None
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
            dt = max(time.time() - t_last, 1e-9)
            tok_s = tokens_per_step * steps_since_log / dt
            flops_s = run.flops_per_step * steps_since_log / dt
            util = mfu(flops_s, 1.0, n_devices=d.world_size, device_name=device_name)
            grad_norm = run.engine.get_global_grad_norm()
            record = {"step": state.step, "train/loss": loss, "train/lr": lr,
                      "train/grad_norm": None if grad_norm is None else float(grad_norm),
                      "train/tokens_per_s": tok_s, "train/mfu": util,
                      "train/samples": state.samples, "train/tokens": state.tokens,
                      "train/skipped_steps": state.skipped_steps}
            if checksums:
                for r, c in enumerate(_rank_checksums(run)):
                    record[f"debug/param_checksum_rank{r}"] = c
            if isinstance(batches, SampleIdRecorder):
                record["debug/sample_ids"] = batches.gather(d.world_size)
            t_last, steps_since_log = time.time(), 0

        at_end = state.step == cfg.train.max_steps
        due = cfg.train.eval_every and state.step % cfg.train.eval_every == 0 or at_end
        if due and cfg.data.val_windows > 0:
            result = run_eval(run)
            record = (record or {"step": state.step}) | result
            if result["val/loss"] < state.best_val_loss - cfg.train.early_stopping_min_delta:
                state.best_val_loss = result["val/loss"]
                state.evals_without_improvement = 0
            else:
                state.evals_without_improvement += 1
            patience = cfg.train.early_stopping_patience
            if patience and state.evals_without_improvement >= patience and not at_end:
                stop_reason = (f"early stopping at step {state.step}: val/loss did not improve "
                               f"for {patience} evals (best {state.best_val_loss:.4f})")

        if d.rank == 0 and record is not None:
            run.metrics.write(record)
            run.tracker.log_metrics({k: v for k, v in record.items() if k != "step"},
                                    step=state.step)
            if "val/loss" in record:
                run.tracker.log_loss_curve(run.metrics.path, state.step)
            run.progress.update(state.step, loss, record.get("train/tokens_per_s", 0.0), lr,
                                record.get("train/mfu"))

        every = cfg.checkpoint.every
        if (every and state.step % every == 0) or at_end or stop or stop_reason:
            save_checkpoint(run)
            saved_step = state.step
        if state.step in kill_after and d.rank == 0:
            log.warning("debug: %s=%d, killing the process group", DEBUG_KILL_AFTER_STEP,
                        state.step)
            os.killpg(os.getpgid(0), signal.SIGKILL)
        if stop:
            if d.rank == 0:
                run.progress.message(f"preempted: checkpoint at step {saved_step} saved; "
                                     f"exiting with {EXIT_PREEMPTED}")
            run.tracker.finish("KILLED")
            return EXIT_PREEMPTED
        if stop_reason:
            if d.rank == 0:
                run.progress.message(stop_reason)
            break
    return EXIT_OK


def train(cfg: RunConfig) -> int:
    """Run on this process's rank (called once per rank); returns the exit code."""
    from pipeline.checkpoint import ResumeError
    from pipeline.dist import init_distributed
    from pipeline.tracking import tracking_status

    d = discover()
    _setup_logging(d.rank)
    preempt = PreemptionFlag().install()
    device = init_distributed(d)
    try:
        run = setup(cfg, d, device)
    except (ValueError, ResumeError) as e:
        log.error("%s", e)
        return EXIT_CONFIG if isinstance(e, ValueError) and not isinstance(e, ResumeError) \
            else EXIT_FAILED
    try:
        with tracking_status(run.tracker):
            code = fit(run, preempt)
    except TrainingError as e:
        log.error("%s", e)
        return EXIT_FAILED
    finally:
        run.loader.close()
        if run.metrics is not None:
            run.metrics.close()
            run.progress.close()
    if d.rank == 0 and code == EXIT_OK:
        log.info("done: %d steps, %d skipped; run dir %s", run.state.step,
                 run.state.skipped_steps, run.run_dir)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train",
                                     description="train a model with DeepSpeed ZeRO")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
