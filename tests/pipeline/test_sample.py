"""How ``zeroforge sample`` turns generated ids into text (pipeline/results/sample.py), with the
real GPT-2 tokenizer."""

from __future__ import annotations

from zeroforge.data_prep.tokenize import get_encoding
from zeroforge.model import EncDecConfig, GPT2Config
from zeroforge.pipeline.results.sample import decode


def test_ids_the_tokenizer_lacks_are_neither_text_nor_negative_sentinels():
    enc = get_encoding("gpt2")
    # A model vocabulary rounded up past the tokenizer's (50257 -> 50304), plus sentinels.
    cfg = EncDecConfig.preset("t5-tiny", vocab_size=50304, n_sentinels=100,
                              pad_token_id=enc.eot_token, eos_token_id=enc.eot_token)
    hello = enc.encode_ordinary("Hello world")
    ids = hello + [50300, 50304, 50305] + hello + [50257]
    assert decode(ids, enc, cfg) == ("Hello world<unused_id_50300><extra_id_0><extra_id_1>"
                                     "Hello world<unused_id_50257>")
    assert "extra_id_-" not in decode(list(range(50257, 50304)), enc, cfg)


def test_decode_stops_at_eos_and_keeps_sentinels():
    enc = get_encoding("gpt2")
    cfg = GPT2Config.preset("gpt2-tiny", n_sentinels=2)  # sentinels 50257, 50258
    ids = [50257] + enc.encode_ordinary(" a b") + [50258, enc.eot_token] + enc.encode_ordinary("x")
    assert decode(ids, enc, cfg) == "<extra_id_0> a b<extra_id_1>"
