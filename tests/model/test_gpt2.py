from __future__ import annotations

import math

import pytest
import torch
from zeroforge.model import GPT2, GPT2Config, gpt2_num_params


def test_shapes_and_loss_path(gpt2_cfg: GPT2Config) -> None:
    m = GPT2(gpt2_cfg)
    x = torch.randint(0, 97, (3, 11))
    logits = m(x)
    assert logits.shape == (3, 11, 97) and logits.dtype == torch.float32
    y = x.roll(-1, dims=1)
    y[:, -1] = -100
    loss = m(x, targets=y)
    assert loss.ndim == 0
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), y[:, :-1].reshape(-1))
    torch.testing.assert_close(loss, ref)
    logits2, loss2 = m(x, targets=y, return_logits=True)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(loss2, loss)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_causality(gpt2_cfg: GPT2Config) -> None:
    m = GPT2(gpt2_cfg).eval()
    x = torch.randint(0, 97, (2, 20))
    x2 = x.clone()
    x2[:, 12:] = torch.randint(0, 97, (2, 8))
    torch.testing.assert_close(m(x)[:, :12], m(x2)[:, :12])
    assert not torch.allclose(m(x)[:, 12:], m(x2)[:, 12:])


def test_too_long_sequence_raises(gpt2_cfg: GPT2Config) -> None:
    with pytest.raises(ValueError, match="n_positions"):
        GPT2(gpt2_cfg)(torch.zeros(1, 65, dtype=torch.long))


def test_vocab_padding(gpt2_cfg: GPT2Config) -> None:
    cfg = GPT2Config.from_dict({**gpt2_cfg.to_dict(), "pad_vocab_to_multiple": 64})
    m = GPT2(cfg)
    assert m.transformer.wte.weight.shape[0] == 128
    assert m.lm_head.weight is m.transformer.wte.weight
    x = torch.randint(0, 97, (2, 9))
    assert m(x).shape == (2, 9, 97)
    # Same weights without padding give the same logits.
    ref = GPT2(gpt2_cfg)
    sd = {k: (v[:97] if k in ("transformer.wte.weight", "lm_head.weight") else v)
          for k, v in m.state_dict().items()}
    ref.load_state_dict(sd)
    torch.testing.assert_close(m(x), ref(x))
    # The padded rows get no gradient: they cannot influence the loss.
    m(x, targets=x).backward()
    assert m.transformer.wte.weight.grad[97:].abs().max() == 0
    assert m.num_params() == ref.num_params()


def test_init_statistics() -> None:
    cfg = GPT2Config(n_layer=8, n_head=4, n_embd=256, vocab_size=1000, n_positions=128,
                     eos_token_id=None)
    m = GPT2(cfg)
    sd = dict(m.named_parameters())
    assert abs(sd["transformer.wte.weight"].std().item() - 0.02) < 1e-3
    assert abs(sd["transformer.h.0.attn.c_attn.weight"].std().item() - 0.02) < 1e-3
    assert abs(sd["transformer.h.3.mlp.c_fc.weight"].std().item() - 0.02) < 1e-3
    target = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name in ("transformer.h.0.attn.c_proj.weight", "transformer.h.7.mlp.c_proj.weight"):
        assert abs(sd[name].std().item() - target) / target < 0.05
    assert sd["transformer.h.0.attn.c_attn.bias"].abs().max() == 0
    assert torch.all(sd["transformer.h.0.ln_1.weight"] == 1)


@pytest.mark.parametrize("name,published", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200),
])
def test_preset_param_counts(name: str, published: int) -> None:
    cfg = GPT2Config.preset(name)
    with torch.device("meta"):
        m = GPT2(cfg)
    assert m.num_params() == published == gpt2_num_params(cfg)
    assert m.num_params(exclude_embeddings=True) == gpt2_num_params(cfg, exclude_embeddings=True)


def test_no_bias_variant(gpt2_cfg: GPT2Config) -> None:
    cfg = GPT2Config.from_dict({**gpt2_cfg.to_dict(), "bias": False})
    m = GPT2(cfg)
    assert all(not n.endswith("bias") for n, _ in m.named_parameters())
    assert m.num_params() == gpt2_num_params(cfg)
    assert m(torch.randint(0, 97, (1, 5))).shape == (1, 5, 97)


def test_activation_checkpointing_same_gradients(gpt2_cfg: GPT2Config) -> None:
    cfg = GPT2Config.from_dict({**gpt2_cfg.to_dict(), "dropout": 0.0})
    ref = GPT2(cfg)
    ck = GPT2(GPT2Config.from_dict({**cfg.to_dict(), "activation_checkpointing": True}))
    ck.load_state_dict(ref.state_dict())
    x = torch.randint(0, 97, (2, 16))
    ref(x, targets=x).backward()
    ck(x, targets=x).backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), ck.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_dropout_train_vs_eval(gpt2_cfg: GPT2Config) -> None:
    m = GPT2(GPT2Config.from_dict({**gpt2_cfg.to_dict(), "dropout": 0.5}))
    x = torch.randint(0, 97, (1, 8))
    m.train()
    assert not torch.allclose(m(x), m(x))
    m.eval()
    torch.testing.assert_close(m(x), m(x))


@pytest.mark.slow
def test_torch_compile_traces_fullgraph(gpt2_cfg: GPT2Config) -> None:
    # backend="eager" checks that dynamo captures the model without graph breaks, without
    # paying for inductor codegen on a 2-core CPU (the benchmark covers --compile end to end).
    m = GPT2(gpt2_cfg)
    x = torch.randint(0, 97, (2, 16))
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, targets=x), m(x, targets=x))
