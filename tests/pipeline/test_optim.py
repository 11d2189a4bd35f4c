"""LR schedules and weight-decay groups."""

from __future__ import annotations

import math

import pytest
from zeroforge.model import GPT2, EncDecConfig, EncoderDecoder, GPT2Config
from zeroforge.pipeline.training.optim import OptimConfig, lr_at, param_groups


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    assert lr_at(500, cfg, 110) == pytest.approx(0.1)  # stays at the floor
    lrs = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_linear_and_constant_and_decay_steps():
    lin = OptimConfig(lr=2.0, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert [lr_at(s, lin, 4) for s in range(5)] == [2.0, 1.5, 1.0, 0.5, 0.0]
    const = OptimConfig(lr=0.3, warmup_steps=2, schedule="constant")
    assert [lr_at(s, const, 100) for s in range(4)] == [0.15, 0.3, 0.3, 0.3]
    short = OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.5, decay_steps=10)
    assert lr_at(10, short, 1000) == pytest.approx(0.5)
    assert math.isclose(lr_at(5, short, 1000), 0.75)


def test_validate_names_keys():
    bad = OptimConfig(lr=0, schedule="exp", betas=[0.9], grad_clip=-1)
    msgs = "\n".join(bad.problems())
    for key in ("optim.lr", "optim.schedule", "optim.betas", "optim.grad_clip"):
        assert key in msgs


def test_gpt2_groups_exclude_biases_norms_embeddings():
    model = GPT2(GPT2Config.preset("gpt2-tiny", vocab_size=100, eos_token_id=99))
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(n.endswith(".weight") and "ln" not in n and "wte" not in n and "wpe" not in n
               for n in decay)
    assert "transformer.wte.weight" in no_decay and "transformer.wpe.weight" in no_decay
    assert any(n.endswith(".bias") for n in no_decay)
    assert any(".ln_" in n for n in no_decay)
    # Every trainable parameter exactly once (the tied LM head is the embedding).
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())


def test_encdec_groups_cover_all_params_once():
    model = EncoderDecoder(EncDecConfig.preset("t5-tiny", vocab_size=100, n_sentinels=8, pad_token_id=0, eos_token_id=1))
    groups = param_groups(model, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
