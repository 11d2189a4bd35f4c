from __future__ import annotations

import pytest
from zeroforge.model import EncDecConfig, GPT2Config, is_sentinel, sentinel_id, sentinel_ids


def test_gpt2_presets_and_padding() -> None:
    c = GPT2Config.preset("gpt2-medium")
    assert (c.n_layer, c.n_head, c.n_embd) == (24, 16, 1024)
    assert c.padded_vocab_size == 50257
    p = GPT2Config.preset("gpt2", pad_vocab_to_multiple=128)
    assert p.padded_vocab_size == 50304 and p.total_vocab_size == 50257
    for name in ("gpt2", "gpt2-large", "gpt2-xl", "gpt2-tiny", "gpt2-mini"):
        GPT2Config.preset(name)


def test_round_trip_and_unknown_keys() -> None:
    c = GPT2Config.preset("gpt2-tiny", dropout=0.1)
    assert GPT2Config.from_dict(c.to_dict()) == c
    e = EncDecConfig.preset("t5-base")
    assert EncDecConfig.from_dict(e.to_dict()) == e
    with pytest.raises(ValueError, match="bogus"):
        GPT2Config.from_dict({**c.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown"):
        EncDecConfig.preset("t5-xxxl")


def test_validation_collects_all_problems() -> None:
    with pytest.raises(ValueError) as err:
        GPT2Config(n_layer=0, n_head=3, n_embd=64, dropout=1.5)
    msg = str(err.value)
    assert "n_layer" in msg and "dropout" in msg
    with pytest.raises(ValueError, match="n_embd .* divisible"):
        GPT2Config(n_layer=1, n_head=3, n_embd=64)
    with pytest.raises(ValueError) as err:
        EncDecConfig.preset("t5-small", vocab_size=32000)  # default special ids are GPT-2's
    assert "pad_token_id" in str(err.value) and "eos_token_id" in str(err.value)


def test_t5_presets_reproduce_hf_vocab() -> None:
    c = EncDecConfig.preset("t5-small", vocab_size=32000, pad_vocab_to_multiple=128,
                            pad_token_id=0, eos_token_id=1)
    assert c.total_vocab_size == 32100 and c.padded_vocab_size == 32128
    assert c.num_decoder_layers == 8 and c.decoder_start_token_id == 0


def test_sentinel_scheme() -> None:
    c = EncDecConfig.preset("t5-tiny")
    ids = sentinel_ids(c)
    assert len(ids) == 100 and ids[0] == 50257 and ids[-1] == 50356
    assert sentinel_id(c, 3) == 50260 and is_sentinel(c, 50260) and not is_sentinel(c, 50256)
    assert c.total_vocab_size == 50357
    with pytest.raises(ValueError):
        sentinel_id(c, 100)
