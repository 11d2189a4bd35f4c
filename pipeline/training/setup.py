"""Everything before the first step: model, engine, data, tracker, and resume from the newest
committed checkpoint (or ``init_from`` weights for a fresh run)."""

from __future__ import annotations

import functools
import gc
import json
import logging
import socket
from pathlib import Path
from typing import Any

import torch.distributed as dist
from zeroforge.data_prep.store import TokenStore
from zeroforge.pipeline import registry
from zeroforge.pipeline.config import RunConfig, dump_yaml
from zeroforge.pipeline.data.eval_set import NoEvalWindows, eval_batches
from zeroforge.pipeline.data.loader import TrainLoader
from zeroforge.pipeline.data.windows import open_stores, store_examples, store_fingerprint
from zeroforge.pipeline.dist import DistEnv
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.results.weights import init_from
from zeroforge.pipeline.tasks.base import Task
from zeroforge.pipeline.tracking.base import Tracker
from zeroforge.pipeline.tracking.metrics_file import MetricsWriter
from zeroforge.pipeline.tracking.params import run_params
from zeroforge.pipeline.tracking.progress import Progress
from zeroforge.pipeline.tracking.summary import command_line, run_summary
from zeroforge.pipeline.tracking.tracker import make_tracker
from zeroforge.pipeline.training import checkpoint as ckpt
from zeroforge.pipeline.training.downstream import make_downstream
from zeroforge.pipeline.training.ds_config import precision_of, zero_stage
from zeroforge.pipeline.training.elastic import ResumePlan, plan_resume
from zeroforge.pipeline.training.engine import (
    build_engine,
    deepspeed_skips_nonfinite,
    detect_device,
    require_tested_deepspeed,
)
from zeroforge.pipeline.training.optim import apply_settings
from zeroforge.pipeline.training.process import seed_everything, use_deterministic_kernels
from zeroforge.pipeline.training.startup import StartupClock
from zeroforge.pipeline.training.state import LoopState, Run

log = logging.getLogger("zeroforge.train")


def store_info(stores: list[TokenStore]) -> tuple[str, int, str, int]:
    """(fingerprint, vocabulary size, tokenizer, end-of-text id) of a run's stores."""
    first = stores[0]
    return store_fingerprint(stores), first.vocab_size, first.tokenizer, first.eot_id


def check_fits_store(model_config: registry.ModelConfig, vocab: int, tokenizer: str, eot: int
                     ) -> None:
    """Refuse a model that cannot read the store's tokens or would misread its document ends."""
    if model_config.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size ({model_config.vocab_size}) is smaller than the "
                          f"token store's vocabulary ({vocab}, tokenizer {tokenizer})")
    special = registry.family_of(model_config).special_ids(model_config)
    for key, value in (("eos_token_id", special.eos), ("pad_token_id", special.pad)):
        if value is not None and value != eot:
            raise ConfigError(f"model.{key}={value} is not the token store's end-of-text id "
                              f"{eot} (tokenizer {tokenizer}), which ends every document; set "
                              f"model.{key}={eot}")


def _all_gather_strings(value: str, world: int) -> list[str]:
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return [str(x) for x in out]


def setup(cfg: RunConfig, d: DistEnv, device: str, clock: StartupClock | None = None) -> Run:
    """Build model, engine, data and tracker; resume from the newest committed checkpoint.
    ``clock`` (main.train's) records how long each part takes.

    A checkpoint whose files turn out corrupt while it loads is set aside and the one before it
    tried, with a fresh engine: never training from bad bytes, never starting over on its own
    (docs/training.md). Every rank sees the same verdict, so all retry together.
    """
    ckpt_dir = cfg.checkpoint.path(Path(cfg.run_dir))
    corrupt: list[str] = []
    while True:
        try:
            return _setup(cfg, d, device, corrupt, clock)
        except ckpt.CorruptCheckpointError as e:
            if e.tag_dir is None:
                raise
            corrupt.append(str(e))
            ckpt.set_aside(e.tag_dir, d.rank)
        gc.collect()  # the failed attempt's engine, before building the next one
        if not ckpt.committed(ckpt_dir):
            raise ckpt.CorruptCheckpointError(
                f"every committed checkpoint in {ckpt_dir} is corrupt ({corrupt[0]}); refusing "
                "to start over: restore a good copy, or move the directory away to start a new "
                "run")


def _setup(cfg: RunConfig, d: DistEnv, device: str, corrupt: list[str],
           clock: StartupClock | None) -> Run:
    mark = functools.partial(StartupClock.mark_on, clock)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = cfg.checkpoint.path(run_dir)
    stores = open_stores(cfg.data)
    fingerprint, vocab, tokenizer, eot = store_info(stores)
    model_config = cfg.build_model_config()
    check_fits_store(model_config, vocab, tokenizer, eot)
    latest = ckpt.latest_committed(ckpt_dir)
    # A checkpoint from another world size: keep its global batch, load it re-partitioned.
    plan = plan_resume(ckpt_dir, latest, cfg.train.micro_batch_size, cfg.train.grad_accum,
                       d.world_size, d.rank)
    cfg = plan.run_config(cfg)
    ds = plan.ds_config(cfg.ds_config(d.world_size, detect_device()))
    family = registry.family_of(model_config)
    use_deterministic_kernels(cfg.train.deterministic, cfg.train.compile, device)
    mark("stores and config")
    engine, n_params = _build(cfg, d, ds, family, model_config, tokenizer,
                              fresh=latest is None)
    mark("model and engine")
    state, client, optim_changes = LoopState(), {}, []
    if latest is not None:
        state, client, optim_changes = _resume(cfg, d, engine, plan, ckpt_dir, latest,
                                               model_config, fingerprint)
    elif d.rank == 0 and (partial := ckpt.partial(ckpt_dir)):
        log.warning("ignoring incomplete checkpoint(s) %s; starting from step 0",
                    [t for _, t in partial])
    mark("resume")

    task = registry.make_task(cfg.task_name, cfg.data, model_config, store_examples(stores))
    loader = TrainLoader(task, cfg.train.micro_batch_size, cfg.train.grad_accum, d.rank,
                         d.world_size, cfg.train.seed, state=client.get("data"),
                         pin_memory=device.startswith("cuda"))
    val = _validation(cfg, task, d)
    mark("data")
    hostnames = _all_gather_strings(socket.gethostname(), d.world_size)
    summary = run_summary(
        recipe=cfg.recipe, family=cfg.model.family, preset=cfg.model.preset, task=task.name,
        n_params=n_params, sources=cfg.data.sources(), stores=stores, world_size=d.world_size,
        zero_stage=zero_stage(ds), precision=precision_of(ds), device=device,
        command=command_line()) if d.rank == 0 else None
    tracker = make_tracker(cfg.tracking, run_dir, d.rank,
                           resume_run_id=client.get("tracking_run_id"), hostnames=hostnames,
                           summary=summary)
    if corrupt and latest is not None:
        _report_fallback(tracker, corrupt, ckpt_dir / latest[1], d.rank)
    run = Run(cfg=cfg, dist=d, device=device, run_dir=run_dir, ckpt_dir=ckpt_dir, engine=engine,
              model_config=model_config, family=family, task=task, ds_config=ds, loader=loader,
              val=val, tracker=tracker, state=state, fingerprint=fingerprint, n_params=n_params,
              flops_per_step=family.flops_per_example(model_config, task.layout)
              * loader.global_batch, tokenizer=tokenizer,
              downstream=make_downstream(cfg.eval, family, model_config, tokenizer, d.rank),
              startup=clock)
    if run.is_main:
        _start_reporting(run)
        if optim_changes:  # MLflow params keep their first values: the tag says what changed
            run.tracker.set_tags({f"zeroforge.optim_changed_at_step_{state.step}":
                                  "; ".join(optim_changes)})
    mark("tracker")
    return run


def _build(cfg: RunConfig, d: DistEnv, ds: dict[str, Any], family: registry.Family,
           model_config: registry.ModelConfig, tokenizer: str, fresh: bool) -> tuple[Any, int]:
    """The DeepSpeed engine around a new model (``init_from`` weights for a fresh fine-tuning
    run), and the model's parameter count."""
    # Same seed on every rank: identical initial weights (DeepSpeed also broadcasts them).
    seed_everything(cfg.train.seed)
    model = family.build(model_config)
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.init_from and fresh:
        # Pretrained weights, fresh optimizer, step 0; loaded into the plain module before
        # DeepSpeed wraps (and, at ZeRO-3, partitions) it.
        source = init_from(model, cfg.init_from, tokenizer)
        if d.rank == 0:
            log.info("init_from: %s; fresh optimizer, starting at step 0", source)
    engine = build_engine(model, ds, cfg.optim, compile_model=cfg.train.compile)
    if not deepspeed_skips_nonfinite(engine):
        require_tested_deepspeed("skipping non-finite steps at ZeRO stage 0")
    # Dropout and other randomness differ per rank from here on.
    seed_everything(cfg.train.seed + 1000 * d.rank + 1)
    return engine, n_params


def _resume(cfg: RunConfig, d: DistEnv, engine: Any, plan: ResumePlan, ckpt_dir: Path,
            latest: tuple[int, str], model_config: registry.ModelConfig, fingerprint: str
            ) -> tuple[LoopState, dict[str, Any], list[str]]:
    """Load the newest committed checkpoint; returns the loop state, the client state and the
    AdamW settings that differ from the checkpoint's (now set to the configured values)."""
    step, tag = latest
    if d.rank == 0:
        log.info("resuming from %s", ckpt_dir / tag)
    # Refuse a different model or store before DeepSpeed tries (and fails) to load it.
    ckpt.check_compatible(ckpt.read_marker(ckpt_dir, tag), model_config, fingerprint,
                          str(ckpt_dir / tag))
    client = plan.load(engine, ckpt_dir, tag, d.rank)
    state = LoopState.from_dict(client.get("loop", {}))
    if state.step != step:
        raise ckpt.ResumeError(f"{ckpt_dir / tag}: client state says step {state.step}")
    # The load restored the saved AdamW settings; train with the configured ones.
    changes = apply_settings(engine.optimizer, cfg.optim)
    if d.rank == 0 and client.get("config_hash") != cfg.config_hash():
        log.warning("the run config changed since the checkpoint (the model's weights and the "
                    "data did not); continuing with the new config")
    if d.rank == 0 and changes:
        log.warning("AdamW settings changed on resume, in effect from step %d: %s", step + 1,
                    "; ".join(changes))
    return state, client, changes


def _validation(cfg: RunConfig, task: Task, d: DistEnv) -> list[dict]:
    """This rank's evaluation batches; none (evaluation off, with a warning) when the store's
    val split is too small for a window, unless early stopping needs them."""
    try:
        return eval_batches(task, cfg.train.eval_micro_batch, d.rank, d.world_size)
    except NoEvalWindows as e:
        if cfg.train.early_stopping_patience:
            raise ConfigError(f"train.early_stopping_patience needs evaluation: {e}") from None
        if d.rank == 0:
            log.warning("%s. Training WITHOUT evaluation (no val/loss).", e)
        return []


def _report_fallback(tracker: Tracker, corrupt: list[str], tag_dir: Path, rank: int) -> None:
    """A loud warning and a run tag: the run went back past a corrupt checkpoint."""
    text = f"{'; '.join(corrupt)}; resumed from {tag_dir} instead"
    if rank == 0:
        log.warning("RESUME FALLBACK: %s", text)
    tracker.set_tags({"zeroforge.resume_fallback": text})


def _start_reporting(run: Run) -> None:
    """Rank 0: resolved configs in the run dir, params and configs to the tracker, the metrics
    file and the progress display."""
    cfg, d, ds = run.cfg, run.dist, run.ds_config
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (run.run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")
    run.tracker.log_params(run_params(cfg.to_dict(), ds, world_size=d.world_size,
                                      n_params=run.n_params, store_fingerprint=run.fingerprint))
    for name in ("config.yaml", "ds_config.json"):
        run.tracker.log_artifact(run.run_dir / name, "config")
    run.metrics = MetricsWriter(run.run_dir, run.state.step)
    run.progress = Progress(run.state.step, cfg.train.max_steps)
    log.info("model %s: %.2fM parameters, world size %d, ZeRO stage %d, %s, task %s, device %s",
             cfg.model.family, run.n_params / 1e6, d.world_size, zero_stage(ds),
             precision_of(ds), run.task.name, run.device)
