"""``train.compile``: the DeepSpeed engine's module compiled by torch.compile through inductor
(DeepSpeed's default backend; generated C++ on CPU), for the GPT-2 and the T5 training step, in
this process. A run stopped after step 2 and resumed gives the uninterrupted run's losses and
weights bitwise. That needs ``train.deterministic`` (on by default on CPU): without it two
uninterrupted compiled runs already differ in the last bits of the tied embedding, whose
gradient inductor's code accumulates with multi-threaded atomic adds (seen with 2 threads; one
thread, or deterministic algorithms, gives equal bits). (The eager-backend trace of the model
alone: tests/model/test_gpt2.py.)"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from zeroforge.pipeline.errors import EXIT_OK
from zeroforge.pipeline.tracking.metrics_file import read_metrics

from tests.pipeline.conftest import train_in_process

STEPS = 4


def _losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def _train(store, run_dir, device, config, max_steps):
    run, code = train_in_process(store, run_dir, device, "train.compile=true",
                                 f"train.max_steps={max_steps}", f"optim.decay_steps={STEPS}",
                                 "checkpoint.every=2", "train.grad_accum=2", config=config,
                                 keep=True)
    assert code == EXIT_OK
    assert run.engine.is_compiled
    return {k: v.detach().clone() for k, v in run.engine.module.state_dict().items()}


@pytest.mark.parametrize("config", ["gpt2-tiny-cpu", "t5-tiny-cpu"])
def test_compiled_training_step_resumes_exactly(store, device, tmp_path, config):
    counters.clear()
    full = _train(store, tmp_path / "full", device, config, STEPS)
    compiled = sum(counters["inductor"].values())
    assert compiled > 0, f"inductor did not compile anything: {dict(counters)}"
    _train(store, tmp_path / "split", device, config, 2)
    resumed = _train(store, tmp_path / "split", device, config, STEPS)
    assert sorted(_losses(tmp_path / "full")) == list(range(1, STEPS + 1))
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
