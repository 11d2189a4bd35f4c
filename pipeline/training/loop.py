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
from zeroforge.pipeline.data.loader import TrainLoader
from zeroforge.pipeline.dist import PreemptionFlag
from zeroforge.pipeline.errors import EXIT_OK, EXIT_PREEMPTED
from zeroforge.pipeline.results.evaluate import evaluate
from zeroforge.pipeline.results.sample import decode
from zeroforge.pipeline.training import checkpoint as ckpt
from zeroforge.pipeline.training.config import TrainConfig
from zeroforge.pipeline.training.engine import local_params_finite
from zeroforge.pipeline.training.optim import lr_at, set_lr
from zeroforge.pipeline.training.state import LoopState, Outcome, Run
from zeroforge.pipeline.training.step import TrainingError, train_step

log = logging.getLogger("zeroforge.train")


def fit(run: Run, preempt: PreemptionFlag) -> int:
    """Train until ``train.max_steps``, early stopping or preemption; returns the exit code
    (raises TrainingError on a step that cannot be recovered)."""
    cfg, state = run.cfg.train, run.state
    if stop_reason := _patience_spent(run):  # early stopping holds across a restart
        if run.is_main:
            run.progress.message(stop_reason)
        return EXIT_OK
    batches = debug.record_batches(iter(run.loader))
    meter = _Meter(run)
    saved_step = state.step
    while state.step < cfg.max_steps:
        lr = lr_at(state.step, run.cfg.optim, cfg.max_steps)
        set_lr(run.engine.optimizer, lr)
        result = train_step(run, batches, preempt)
        _startup_done(run)
        warning = count_step(state, result.outcome, cfg, run.loader)
        if warning and run.is_main:
            log.warning(warning)
        at_end = state.step == cfg.max_steps
        record = None
        if state.step % cfg.log_every == 0 or at_end:
            record = {"step": state.step, "train/loss": result.loss, "train/lr": lr,
                      **meter.read(), "train/samples": state.samples, "train/tokens": state.tokens,
                      "train/skipped_steps": state.skipped_steps,
                      "train/overflow_steps": state.overflow_steps,
                      **debug.step_metrics(run.engine, batches, run.dist.world_size, run.device)}
        due = cfg.eval_every and state.step % cfg.eval_every == 0 or at_end
        if due and run.val:  # none: data.val_windows is 0, or the val split is too small
            evaluated = run_eval(run)
            record = (record or {"step": state.step}) | evaluated
            stop_reason = _early_stopping(run, evaluated["val/loss"], at_end)
        final = at_end or bool(stop_reason)
        if run.downstream is not None and run.downstream.due(state.step, final):
            record = (record or {"step": state.step}) | run.downstream.evaluate(run.engine)
        if record is not None and run.is_main:
            _report(run, record, result.loss, lr)
        every = run.cfg.checkpoint.every
        if (every and state.step % every == 0) or at_end or result.stop or stop_reason:
            save_checkpoint(run)
            saved_step = state.step
        debug.kill_after_step(state.step, run.dist.rank)
        if result.stop:
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


def count_step(state: LoopState, outcome: Outcome, cfg: TrainConfig, loader: TrainLoader
               ) -> str | None:
    """Advance ``state`` by one step of ``outcome``; returns the warning a skipped step gets and
    raises TrainingError past ``train.max_nonfinite_in_a_row`` / ``max_overflows_in_a_row``.

    Non-finite losses and fp16 loss-scale overflows are counted apart: overflows are how the
    loss scaler finds its scale (a healthy run has a burst of them at the start), so they
    neither end nor extend a run of non-finite steps, and they have their own limit."""
    state.step += 1
    state.samples += loader.global_batch
    state.tokens += loader.tokens_per_global_step
    if outcome is Outcome.APPLIED:
        state.nonfinite_in_a_row = state.overflows_in_a_row = 0
        return None
    state.skipped_steps += 1
    if outcome is Outcome.OVERFLOW:
        state.overflow_steps += 1
        state.overflows_in_a_row += 1
        n, limit = state.overflows_in_a_row, cfg.max_overflows_in_a_row
        what, key = "fp16 loss-scale overflow", "max_overflows_in_a_row"
        kind = "fp16 loss-scale overflows"
    else:
        state.nonfinite_in_a_row += 1
        n, limit = state.nonfinite_in_a_row, cfg.max_nonfinite_in_a_row
        what, key = "non-finite loss or gradients on some rank", "max_nonfinite_in_a_row"
        kind = "non-finite steps"
    if n > limit:
        raise TrainingError(f"step {state.step}: {n} {kind} in a row (more than "
                            f"train.{key}={limit})")
    return f"step {state.step}: {what}; step skipped ({n} in a row, {state.skipped_steps} in total)"


def _startup_done(run: Run) -> None:
    """After the first step of this process: rank 0 logs where the time to it went."""
    if run.startup is not None:
        run.startup.mark("first step")
        if run.is_main:
            log.info(run.startup.line())
        run.startup = None


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
    return None if at_end else _patience_spent(run)


def _patience_spent(run: Run) -> str | None:
    """Why to stop now, when ``train.early_stopping_patience`` evals brought no improvement
    (checked after each eval, and at the start: a restarted run stops where it stopped)."""
    cfg, state = run.cfg.train, run.state
    patience = cfg.early_stopping_patience
    if patience and state.evals_without_improvement >= patience and state.step < cfg.max_steps:
        return (f"early stopping at step {state.step}: val/loss did not improve for "
                f"{state.evals_without_improvement} evals (train.early_stopping_patience="
                f"{patience}; best {state.best_val_loss:.4f})")
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
    step = run.state.step
    if run.is_main:
        run.tracker.log_metrics(result, step=step)
        run.progress.message(f"eval step {step}: val/loss {result['val/loss']:.4f} "
                             f"val/ppl {result['val/ppl']:.2f}")
    _log_samples(run, step)
    return result


def _log_samples(run: Run, step: int) -> None:
    """A few greedy and top-k outputs for fixed prompts, logged by rank 0.

    Under ZeRO-3 no rank holds the whole model: every rank generates in lockstep, the module's
    hooks gathering each layer's parameters from all ranks, as in a training forward. So that
    every rank runs exactly the same number of forward passes, generation never stops early at
    EOS (``decode`` cuts the text there); the other stages do the same, and their samples match.
    """
    cfg = run.cfg.train
    gathered = run.engine.zero_optimization_stage() == 3
    if (cfg.sample_tokens == 0 or not cfg.sample_prompts or run.cfg.tracking.backend == "none"
            or not (run.is_main or gathered)):
        return
    enc = get_encoding(run.tokenizer)
    prompts = [run.task.prompt_ids(p, enc) for p in cfg.sample_prompts]
    model, n = run.engine.module, cfg.sample_tokens
    greedy = run.family.generate(model, prompts, n, Sampling(stop_at_eos=False))
    topk = run.family.generate(model, prompts, n, Sampling(do_sample=True, top_k=40, seed=step,
                                                           stop_at_eos=False))
    if not run.is_main:
        return
    samples = [{"prompt": p, "greedy": decode(g, enc, run.model_config),
                "top_k_40": decode(t, enc, run.model_config)}
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
        "model_family": run.family.name,
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
