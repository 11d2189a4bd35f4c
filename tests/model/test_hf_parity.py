"""Both directions of HF conversion, checked on logits (tiny random fp32 models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from zeroforge.model import (
    GPT2,
    EncDecConfig,
    EncoderDecoder,
    GPT2Config,
    load_encdec_hf,
    load_gpt2_hf,
    save_encdec_hf,
    save_gpt2_hf,
)

ATOL = 1e-4


def _hf_gpt2(cfg: GPT2Config) -> transformers.GPT2LMHeadModel:
    hc = transformers.GPT2Config(vocab_size=cfg.total_vocab_size, n_positions=cfg.n_positions,
                                 n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                 bos_token_id=cfg.eos_token_id, eos_token_id=cfg.eos_token_id)
    return transformers.GPT2LMHeadModel(hc).eval()


@pytest.mark.parametrize("pad_multiple,bias", [(1, True), (64, True), (1, False)])
def test_gpt2_export_to_hf(tmp_path: Path, gpt2_cfg: GPT2Config, pad_multiple: int,
                           bias: bool) -> None:
    cfg = GPT2Config.from_dict({**gpt2_cfg.to_dict(), "pad_vocab_to_multiple": pad_multiple,
                                "bias": bias})
    ours = GPT2(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm / bias values so the mapping is really tested
        for n, p in ours.named_parameters():
            if "ln_" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    save_gpt2_hf(ours, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert sd["transformer.wte.weight"].shape[0] == 97  # padding dropped
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=ATOL, rtol=0)
    back = load_gpt2_hf(tmp_path)
    assert back.config == cfg  # zeroforge_config.json restores padding etc.
    torch.testing.assert_close(back(x), ours(x), atol=1e-6, rtol=0)


def test_gpt2_import_from_hf(tmp_path: Path, gpt2_cfg: GPT2Config) -> None:
    hf = _hf_gpt2(gpt2_cfg)
    hf.save_pretrained(tmp_path)
    ours = load_gpt2_hf(tmp_path).eval()
    assert ours.lm_head.weight is ours.transformer.wte.weight
    x = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=0)
    padded = load_gpt2_hf(tmp_path, pad_vocab_to_multiple=128)
    torch.testing.assert_close(padded(x), ours(x), atol=1e-6, rtol=0)


def _hf_t5(cfg: EncDecConfig, tie: bool) -> transformers.T5ForConditionalGeneration:
    hc = transformers.T5Config(
        vocab_size=cfg.total_vocab_size, d_model=cfg.d_model, d_ff=cfg.d_ff, d_kv=cfg.d_kv,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=tie, pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id, decoder_start_token_id=cfg.decoder_start_token_id)
    return transformers.T5ForConditionalGeneration(hc).eval()


def _t5_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Long enough (40) that relative distances reach the logarithmic buckets.
    src = torch.randint(2, 100, (2, 40))
    mask = torch.ones_like(src)
    mask[1, 30:] = 0
    tgt = torch.randint(2, 100, (2, 33))
    return src, mask, tgt


@pytest.mark.parametrize("pad_multiple", [1, 64])
def test_t5_export_to_hf(tmp_path: Path, t5_cfg: EncDecConfig, pad_multiple: int) -> None:
    cfg = EncDecConfig.from_dict({**t5_cfg.to_dict(), "pad_vocab_to_multiple": pad_multiple})
    ours = EncoderDecoder(cfg).eval()
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "ln" in n:
                p.add_(torch.randn_like(p) * 0.1)
    save_encdec_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 100
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert hf.lm_head.weight.data_ptr() != hf.shared.weight.data_ptr()  # stays untied
    src, mask, tgt = _t5_inputs()
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        torch.testing.assert_close(ref, ours(src, tgt, attention_mask=mask), atol=ATOL, rtol=0)
    back = load_encdec_hf(tmp_path)
    assert back.config == cfg
    torch.testing.assert_close(back(src, tgt, attention_mask=mask),
                               ours(src, tgt, attention_mask=mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_t5_import_from_hf(tmp_path: Path, t5_cfg: EncDecConfig, tie: bool) -> None:
    hf = _hf_t5(t5_cfg, tie)
    hf.save_pretrained(tmp_path)
    ours = load_encdec_hf(tmp_path).eval()
    assert ours.config.total_vocab_size == 100 and ours.config.n_sentinels == 0
    src, mask, tgt = _t5_inputs()
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        torch.testing.assert_close(ours(src, tgt, attention_mask=mask), ref, atol=ATOL, rtol=0)
        labels = tgt.clone()
        labels[:, -3:] = -100
        hf_loss = hf(input_ids=src, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(ours(src, attention_mask=mask, labels=labels), hf_loss,
                                   atol=ATOL, rtol=0)
