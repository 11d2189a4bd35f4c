"""The step loop: steps, metrics, evaluation with early stopping, checkpoints, preemption."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch
import torch.distributed as dist
from zeroforge.data_prep.tokenize import get_encoding
from zeroforge.model import Sampling, mfu
from zeroforge.pipeline import debug
from zeroforge.pipeline.dist import PreemptionFlag
from zeroforge.pipeline.errors import EXIT_OK, EXIT_PREEMPTED
from zeroforge.pipeline.results.evaluate import evaluate
from zeroforge.pipeline.training import checkpoint as ckpt
from zeroforge.pipeline.training.engine import local_params_finite
from zeroforge.pipeline.training.optim import lr_at, set_lr
from zeroforge.pipeline.training.state import Run
from zeroforge.pipeline.training.step import TrainingError, train_step

log = logging.getLogger("zeroforge.train")


def fit(run: Run, preempt: PreemptionFlag) -> int:
    """Train until ``train.max_steps``, early stopping or preemption; returns the exit code
    (raises TrainingError on a step that cannot be recovered)."""
    cfg, state = run.cfg.train, run.state
    batches = debug.record_batches(iter(run.loader))
    meter = _Meter(run)
    saved_step, stop_reason = state.step, None
    while state.step < cfg.max_steps:
        lr = lr_at(state.step, run.cfg.optim, cfg.max_steps)
        set_lr(run.engine.optimizer, lr)
        loss, skipped, stop = train_step(run, batches, preempt)
        _count_step(run, skipped)
        at_end = state.step == cfg.max_steps
        record = None
        if state.step % cfg.log_every == 0 or at_end:
            record = {"step": state.step, "train/loss": loss, "train/lr": lr, **meter.read(),
                      "train/samples": state.samples, "train/tokens": state.tokens,
                      "train/skipped_steps": state.skipped_steps,
                      **debug.step_metrics(run.engine, batches, run.dist.world_size, run.device)}
        due = cfg.eval_every and state.step % cfg.eval_every == 0 or at_end
        if due and run.val:  # none: data.val_windows is 0, or the val split is too small
            result = run_eval(run)
            record = (record or {"step": state.step}) | result
            stop_reason = _early_stopping(run, result["val/loss"], at_end)
        final = at_end or bool(stop_reason)
        if run.downstream is not None and run.downstream.due(state.step, final):
            record = (record or {"step": state.step}) | run.downstream.evaluate(run.engine)
        if record is not None and run.is_main:
            _report(run, record, loss, lr)
        every = run.cfg.checkpoint.every
        if (every and state.step % every == 0) or at_end or stop or stop_reason:
            save_checkpoint(run)
            saved_step = state.step
        debug.kill_after_step(state.step, run.dist.rank)
        if stop:
            if run.is_main:
                run.progress.message(f"preempted: checkpoint at step {saved_step} saved; "
                                     f"exiting with {EXIT_PREEMPTED}")
            run.tracker.finish("KILLED")
            return EXIT_PREEMPTED
        if stop_reason:
            if run.is_main:
                run.progress.message(stop_reason)
            break
    return EXIT_OK


def _count_step(run: Run, skipped: bool) -> None:
    state, limit = run.state, run.cfg.train.max_nonfinite_in_a_row
    state.step += 1
    state.samples += run.loader.global_batch
    state.tokens += run.loader.tokens_per_global_step
    if not skipped:
        state.nonfinite_in_a_row = 0
        return
    state.skipped_steps += 1
    state.nonfinite_in_a_row += 1
    if run.is_main:
        log.warning("step %d: non-finite loss or gradients on some rank; step skipped "
                    "(%d in a row, %d in total)", state.step, state.nonfinite_in_a_row,
                    state.skipped_steps)
    if state.nonfinite_in_a_row > limit:
        raise TrainingError(f"step {state.step}: {state.nonfinite_in_a_row} non-finite steps in "
                            f"a row (more than train.max_nonfinite_in_a_row={limit})")


class _Meter:
    """Throughput and MFU since the previous metrics line."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.device_name = (torch.cuda.get_device_name() if run.device.startswith("cuda")
                            else None)
        self.t_last, self.last_step = time.time(), run.state.step

    def read(self) -> dict[str, Any]:
        run, now = self.run, time.time()
        steps, dt = run.state.step - self.last_step, max(now - self.t_last, 1e-9)
        self.t_last, self.last_step = now, run.state.step
        grad_norm = run.engine.get_global_grad_norm()
        return {
            "train/grad_norm": None if grad_norm is None else float(grad_norm),
            "train/tokens_per_s": run.loader.tokens_per_global_step * steps / dt,
            # Per step since the previous line: time this rank's loop waited for batches.
            "train/data_wait_s": run.loader.take_wait() / max(steps, 1),
            "train/mfu": mfu(run.flops_per_step * steps / dt, 1.0,
                             n_devices=run.dist.world_size, device_name=self.device_name),
        }


def _early_stopping(run: Run, val_loss: float, at_end: bool) -> str | None:
    """Update the best val loss; the reason to stop, when patience has run out."""
    cfg, state = run.cfg.train, run.state
    if val_loss < state.best_val_loss - cfg.early_stopping_min_delta:
        state.best_val_loss = val_loss
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    patience = cfg.early_stopping_patience
    if patience and state.evals_without_improvement >= patience and not at_end:
        return (f"early stopping at step {state.step}: val/loss did not improve for {patience} "
                f"evals (best {state.best_val_loss:.4f})")
    return None


def _report(run: Run, record: dict[str, Any], loss: float, lr: float) -> None:
    """Rank 0: the metrics line, the tracker and the progress display."""
    step = run.state.step
    run.metrics.write(record)
    run.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step)
    if "val/loss" in record:
        run.tracker.log_loss_curve(run.metrics.path, step)
    run.progress.update(step, loss, record.get("train/tokens_per_s", 0.0), lr,
                        record.get("train/mfu"))


def run_eval(run: Run) -> dict[str, float]:
    result = evaluate(run.engine, run.val, run.task, run.device)
    if run.is_main:
        step = run.state.step
        run.tracker.log_metrics(result, step=step)
        run.progress.message(f"eval step {step}: val/loss {result['val/loss']:.4f} "
                             f"val/ppl {result['val/ppl']:.2f}")
        _log_samples(run, step)
    return result


def _log_samples(run: Run, step: int) -> None:
    """A few greedy and top-k outputs for fixed prompts (rank 0, ZeRO 0-2)."""
    cfg = run.cfg.train
    if (cfg.sample_tokens == 0 or not cfg.sample_prompts
            or run.engine.zero_optimization_stage() == 3 or run.tracker.run_id is None):
        return
    enc = get_encoding(run.tokenizer)
    prompts = [run.task.prompt_ids(p, enc) for p in cfg.sample_prompts]
    model = run.engine.module
    greedy = run.family.generate(model, prompts, cfg.sample_tokens)
    topk = run.family.generate(model, prompts, cfg.sample_tokens,
                               Sampling(do_sample=True, top_k=40, seed=step))
    samples = [{"prompt": p, "greedy": enc.decode(g), "top_k_40": enc.decode(t)}
               for p, g, t in zip(cfg.sample_prompts, greedy, topk, strict=True)]
    run.tracker.log_text(json.dumps(samples, indent=1), f"samples/step_{step:07d}.json")


def save_checkpoint(run: Run) -> None:
    ok = torch.tensor([1.0 if local_params_finite(run.engine) else 0.0], device=run.device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() < 1:
        raise TrainingError(f"step {run.state.step}: parameters are not finite; refusing to "
                            "write a checkpoint")
    client = {
        "loop": run.state.to_dict(),
        "data": run.loader.state_dict(),
        "tracking_run_id": run.tracker.run_id if run.is_main else None,
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
    if run.is_main:
        run.progress.message(f"checkpoint step {run.state.step} committed in "
                             f"{time.time() - t0:.1f}s")
