"""The DeepSpeed engine built from a merged config (pipeline/training/engine.py)."""

from __future__ import annotations

import pytest
import torch
from zeroforge.model import GPT2, GPT2Config
from zeroforge.pipeline.config import load_run_config
from zeroforge.pipeline.training.ds_config import Device
from zeroforge.pipeline.training.engine import build_engine


@pytest.mark.parametrize("stage", [0, 1])
def test_gpu_config_gives_torch_fused_adamw(device, stage):
    # The config a GPU run gets (no GPU here: torch's fused AdamW also runs on CPU, so the
    # DeepSpeed path that builds it is exercised for real; only the CUDA kernel is not).
    cfg = load_run_config("gpt2-tiny-cpu", ["data.store=/s", "train.grad_accum=1",
                                            f"deepspeed.zero_optimization.stage={stage}"])
    ds = cfg.ds_config(1, Device(cpu=False))
    model = GPT2(GPT2Config.preset("gpt2-tiny", vocab_size=128, eos_token_id=127))
    engine = build_engine(model, ds, cfg.optim)
    basic = engine.basic_optimizer
    assert type(basic) is torch.optim.AdamW and basic.defaults["fused"] is True
    x = torch.randint(0, 128, (cfg.train.micro_batch_size, 16))
    before = [p.detach().clone() for p in model.parameters()]
    engine.backward(engine(x, x))
    engine.step()
    assert engine.was_step_applied()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
