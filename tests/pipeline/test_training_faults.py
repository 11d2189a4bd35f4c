"""Faults of the training loop, each in this process with a real DeepSpeed engine (world size
1 over gloo) on the builtin pydoc corpus:

- a skipped (non-finite) step at ZeRO stage 0 with ``train.grad_accum: 1``, fp32 and bf16;
- stage-0 bf16 checkpoints read back as the optimizer's fp32 masters, not the bf16 module;
- resume applies changed ``optim.weight_decay`` / ``betas`` / ``eps`` at every ZeRO stage and
  records the change (the elastic path: tests/e2e/test_elastic.py);
- resume accepts model fields that leave the weights alone;
- early stopping holds after a restart;
- samples are logged under ZeRO-3 too.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from zeroforge.pipeline.errors import EXIT_OK
from zeroforge.pipeline.results.weights import read_checkpoint
from zeroforge.pipeline.tracking.metrics_file import read_metrics
from zeroforge.pipeline.training import checkpoint as ckpt

from tests.pipeline.conftest import train_in_process

NAN = {"ZEROFORGE_DEBUG_NAN_STEPS": "2", "ZEROFORGE_DEBUG_CHECKSUM": "1"}


def _checksum(record):
    return record["debug/param_checksum_rank0"]


@pytest.fixture(scope="module")
def stage0_runs(store, device, tmp_path_factory):
    """fp32 and bf16 stage-0 runs of 4 steps whose step 2 has a NaN loss."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in NAN.items():
            mp.setenv(name, value)
        for precision in ("fp32", "bf16"):
            run_dir = tmp_path_factory.mktemp(f"stage0-{precision}")
            out[precision] = (run_dir, *train_in_process(
                store, run_dir, device, "deepspeed.zero_optimization.stage=0",
                f"train.precision={precision}", "train.max_steps=4", "checkpoint.every=0",
                keep=True))
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stage0_skip_with_grad_accum_1(stage0_runs, precision):
    # Before the fix the manual skip left DeepSpeed's "step applied" flag of step 1 in place
    # and the loop stopped with "DeepSpeed applied an update with non-finite gradients".
    run_dir, run, code = stage0_runs[precision]
    assert code == EXIT_OK
    by_step = {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}
    assert sorted(by_step) == [1, 2, 3, 4]
    assert by_step[2]["train/loss"] == "nan" and by_step[2]["train/skipped_steps"] == 1
    assert _checksum(by_step[2]) == _checksum(by_step[1]), "the skipped step changed weights"
    assert _checksum(by_step[3]) != _checksum(by_step[2])
    assert by_step[4]["train/skipped_steps"] == 1 and by_step[4]["train/overflow_steps"] == 0
    assert [s for s, _ in ckpt.committed(run.ckpt_dir)] == [4]
    assert run.engine.global_steps == 4 and run.engine.skipped_steps == 1


def test_stage0_bf16_checkpoint_gives_the_fp32_masters(stage0_runs):
    run_dir, run, _ = stage0_runs["bf16"]
    optimizer = run.engine.optimizer
    # DeepSpeed's stage-0 bf16 wrapper around torch's AdamW: an fp32 master per parameter of
    # the bf16 module. (With DeepSpeed's FusedAdam, a GPU's, it is FP16_Optimizer with one flat
    # fp32 buffer per group; weights.py reads both layouts.)
    assert isinstance(optimizer, FP16_UnfusedOptimizer)
    names = {id(p): n for n, p in run.engine.module.named_parameters()}
    masters = {}
    for fp32, params in zip(optimizer.fp32_groups, optimizer.fp16_groups, strict=True):
        for p, value in zip(params, fp32, strict=True):
            masters[names[id(p)]] = value
    _, state = read_checkpoint(run_dir)
    module = run.engine.module.state_dict()
    rounded = 0
    for name, value in masters.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], value), name
        rounded += int(not torch.equal(module[name].float(), value))
    assert rounded > 0, "the bf16 module should be a rounded copy of the masters"
    # The tied LM head (GPT-2) reads the embedding's master under its own name too.
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_applies_changed_adamw_settings(store, device, tmp_path, stage, caplog):
    common = [f"deepspeed.zero_optimization.stage={stage}", "checkpoint.every=2"]
    train_in_process(store, tmp_path, device, *common, "train.max_steps=2")
    changed = ["optim.weight_decay=0.02", "optim.betas=[0.8,0.9]", "optim.eps=1e-6"]
    with caplog.at_level(logging.WARNING, logger="zeroforge.train"):
        run, code = train_in_process(store, tmp_path, device, *common, *changed,
                                     "train.max_steps=3", keep=True)
    assert code == EXIT_OK and run.state.step == 3
    groups = {g["name"]: g for g in run.engine.optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 0.02 and groups["no_decay"]["weight_decay"] == 0.0
    for g in groups.values():  # what the optimizer steps with, not what the config says
        assert tuple(g["betas"]) == (0.8, 0.9) and g["eps"] == 1e-6
    assert ("AdamW settings changed on resume, in effect from step 3: optim.weight_decay: "
            "0.1 -> 0.02; optim.betas: [0.9, 0.95] -> [0.8, 0.9]; optim.eps: 1e-08 -> 1e-06"
            in caplog.text)


def test_resume_change_is_tagged_in_mlflow(store, device, tmp_path):
    from mlflow.tracking import MlflowClient

    tracking = ["tracking.backend=mlflow", "tracking.system_metrics=false", "checkpoint.every=2"]
    train_in_process(store, tmp_path, device, *tracking, "train.max_steps=2")
    run, _ = train_in_process(store, tmp_path, device, *tracking, "train.max_steps=3",
                              "optim.weight_decay=0.05")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tags = client.get_run(run.tracker.run_id).data.tags
    assert tags["zeroforge.optim_changed_at_step_2"] == "optim.weight_decay: 0.1 -> 0.05"


def test_resume_accepts_weight_neutral_model_changes(store, device, tmp_path):
    train_in_process(store, tmp_path, device, "train.max_steps=2", "checkpoint.every=2")
    run, code = train_in_process(store, tmp_path, device, "train.max_steps=3",
                                 "model.activation_checkpointing=true", "model.dropout=0.1")
    assert code == EXIT_OK and run.state.step == 3
    assert run.model_config.activation_checkpointing and run.model_config.dropout == 0.1


# ----------------------------------------------------------------------------- early stopping


def test_early_stopping_holds_after_a_restart(store, device, tmp_path):
    # No eval after the first improves by min_delta: patience 2 runs out at the eval of step 6.
    stop = ["train.max_steps=40", "train.eval_every=2", "train.early_stopping_patience=2",
            "train.early_stopping_min_delta=100", "checkpoint.every=1000"]
    first, code = train_in_process(store, tmp_path, device, *stop)
    assert code == EXIT_OK and first.state.step == 6
    stopped_at = first.state.step
    assert first.state.evals_without_improvement == 2
    again, code = train_in_process(store, tmp_path, device, *stop)
    assert code == EXIT_OK
    assert again.state.step == stopped_at, "the restart trained on instead of stopping"
    assert max(r["step"] for r in read_metrics(tmp_path)) == stopped_at


# ----------------------------------------------------------------------------- samples


def test_samples_are_logged_under_zero3(store, device, tmp_path):
    from mlflow.tracking import MlflowClient

    run, code = train_in_process(
        store, tmp_path, device, "deepspeed.zero_optimization.stage=3", "train.max_steps=2",
        "train.sample_tokens=5", "tracking.backend=mlflow", "tracking.system_metrics=false",
        "checkpoint.every=0")
    assert code == EXIT_OK
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = client.download_artifacts(run.tracker.run_id, "samples/step_0000002.json",
                                     str(tmp_path / "dl"))
    samples = json.loads(open(path).read())
    assert [s["prompt"] for s in samples] == ["The", "Once upon a time"]
    assert all(isinstance(s["greedy"], str) and isinstance(s["top_k_40"], str) for s in samples)
