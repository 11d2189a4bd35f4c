from __future__ import annotations

import pytest
import torch
import transformers
from zeroforge.model import EncDecConfig, EncoderDecoder, encdec_num_params


def test_shapes_and_loss_path(t5_cfg: EncDecConfig) -> None:
    m = EncoderDecoder(t5_cfg)
    src = torch.randint(0, 100, (2, 13))
    tgt = torch.randint(0, 100, (2, 7))
    logits = m(src, tgt)
    assert logits.shape == (2, 7, 100) and logits.dtype == torch.float32
    labels = tgt.clone()
    labels[0, -2:] = -100
    loss = m(src, labels=labels)
    dec_in = m.shift_right(labels)
    assert dec_in[0, 0] == t5_cfg.decoder_start_token_id
    assert torch.equal(dec_in[:, 1:], labels[:, :-1].masked_fill(labels[:, :-1] == -100, 0))
    ref = torch.nn.functional.cross_entropy(m(src, dec_in).reshape(-1, 100), labels.reshape(-1))
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_decoder_causality_and_encoder_mask(t5_cfg: EncDecConfig) -> None:
    m = EncoderDecoder(t5_cfg).eval()
    src = torch.randint(2, 100, (2, 10))
    tgt = torch.randint(2, 100, (2, 9))
    tgt2 = tgt.clone()
    tgt2[:, 5:] = torch.randint(2, 100, (2, 4))
    torch.testing.assert_close(m(src, tgt)[:, :5], m(src, tgt2)[:, :5])
    # Masked source padding must not matter, whatever its ids.
    mask = torch.ones_like(src)
    mask[:, 7:] = 0
    src2 = src.clone()
    src2[:, 7:] = 5
    torch.testing.assert_close(m(src, tgt, attention_mask=mask), m(src2, tgt, attention_mask=mask))
    torch.testing.assert_close(m(src, tgt, attention_mask=mask), m(src[:, :7], tgt), atol=1e-5,
                               rtol=1e-5)


def test_vocab_padding(t5_cfg: EncDecConfig) -> None:
    cfg = EncDecConfig.from_dict({**t5_cfg.to_dict(), "pad_vocab_to_multiple": 64})
    m = EncoderDecoder(cfg)
    assert m.shared.weight.shape[0] == 128 and m.lm_head.weight.shape[0] == 128
    src, tgt = torch.randint(0, 100, (1, 6)), torch.randint(0, 100, (1, 4))
    assert m(src, tgt).shape == (1, 4, 100)
    assert m.num_params() == encdec_num_params(cfg) == encdec_num_params(t5_cfg)


def test_activation_checkpointing_same_gradients(t5_cfg: EncDecConfig) -> None:
    ref = EncoderDecoder(t5_cfg)
    ck = EncoderDecoder(EncDecConfig.from_dict({**t5_cfg.to_dict(),
                                                "activation_checkpointing": True}))
    ck.load_state_dict(ref.state_dict())
    src, labels = torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 5))
    ref(src, labels=labels).backward()
    ck(src, labels=labels).backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), ck.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def _hf_t5_config(cfg: EncDecConfig) -> transformers.T5Config:
    return transformers.T5Config(
        vocab_size=cfg.padded_vocab_size, d_model=cfg.d_model, d_ff=cfg.d_ff, d_kv=cfg.d_kv,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


@pytest.mark.parametrize("name,published", [
    ("t5-small", 77e6), ("t5-base", 248e6), ("t5-large", 783e6),
])
def test_preset_param_counts_match_hf(name: str, published: float) -> None:
    cfg = EncDecConfig.preset(name, vocab_size=32000, pad_vocab_to_multiple=128,
                              pad_token_id=0, eos_token_id=1)
    with torch.device("meta"):
        ours = EncoderDecoder(cfg)
        hf = transformers.T5ForConditionalGeneration(_hf_t5_config(cfg))
    n_ours = sum(p.numel() for p in ours.parameters())  # allocated, incl. padding to 32128
    # HF >= 5 ties lm_head to `shared` in memory even for v1.1; the real checkpoint is untied.
    n_hf = sum(p.numel() for p in hf.parameters())
    if hf.lm_head.weight is hf.shared.weight:
        n_hf += hf.lm_head.weight.numel()
    assert n_ours == n_hf
    assert abs(n_ours - published) / published < 0.01
    assert ours.num_params() == encdec_num_params(cfg)


def test_init_statistics() -> None:
    cfg = EncDecConfig(d_model=256, d_ff=512, num_layers=2, num_heads=4, d_kv=64, vocab_size=500,
                       n_sentinels=0, pad_token_id=0, eos_token_id=1)
    m = EncoderDecoder(cfg)
    blk = m.encoder.blocks[0]
    assert abs(m.shared.weight.std().item() - 1.0) < 0.02
    assert abs(blk.attn.q.weight.std().item() - (256 * 64) ** -0.5) < 1e-3
    assert abs(blk.attn.k.weight.std().item() - 256**-0.5) < 2e-3
    assert abs(blk.mlp.wo.weight.std().item() - 512**-0.5) < 2e-3
