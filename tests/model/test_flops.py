from __future__ import annotations

import pytest
import torch
from zeroforge.model import (
    EncDecConfig,
    EncoderDecoder,
    GPT2Config,
    encdec_flops_per_token,
    encdec_num_params,
    gpt2_flops_per_token,
    gpt2_num_params,
    mfu,
)


def test_gpt2_flops_formula() -> None:
    cfg = GPT2Config.preset("gpt2")
    N = 124_439_808 - 1024 * 768  # everything but the position table (head = wte, a matmul)
    assert gpt2_flops_per_token(cfg, 1024) == 6 * N + 12 * 12 * 12 * 64 * 1024
    # Known ballpark: ~0.85 GFLOP per token for gpt2 at T=1024 (nanoGPT's estimate).
    assert 0.8e9 < gpt2_flops_per_token(cfg) < 0.9e9


def test_encdec_flops_reduce_to_matmul_count() -> None:
    cfg = EncDecConfig.preset("t5-tiny")
    # Without attention-score terms (S=T=1) the forward cost is 2 FLOPs per weight touched per
    # token: every matrix parameter is used once per example when S = T = 1.
    n_matrix = encdec_num_params(cfg) - cfg.total_vocab_size * cfg.d_model  # minus the lookup
    n_matrix -= 2 * cfg.relative_attention_num_buckets * cfg.num_heads  # bias tables: lookups
    n_matrix -= cfg.d_model * (2 * cfg.num_layers + 3 * cfg.num_decoder_layers + 2)  # norms
    attn = 4 * cfg.inner_dim * (cfg.num_layers + 2 * cfg.num_decoder_layers)
    assert encdec_flops_per_token(cfg, 1, 1) == pytest.approx(3 * (2 * n_matrix + attn))
    # More source tokens make each target token more expensive.
    assert encdec_flops_per_token(cfg, 512, 114) > encdec_flops_per_token(cfg, 114, 114)


def test_encdec_param_count_matches_model() -> None:
    cfg = EncDecConfig.preset("t5-base")
    with torch.device("meta"):
        m = EncoderDecoder(cfg)
    assert m.num_params() == encdec_num_params(cfg)
    assert m.num_params(exclude_embeddings=True) == encdec_num_params(cfg, True)
    assert gpt2_num_params(GPT2Config.preset("gpt2"), exclude_embeddings=True) == 85_056_000


def test_mfu() -> None:
    assert mfu(1000.0, 1e9, device_name="cpu") is None
    assert mfu(1000.0, 1e9) is None
    assert mfu(989e3, 1e9, device_name="NVIDIA H100 80GB HBM3") == pytest.approx(1.0)
    assert mfu(312e3, 1e9, n_devices=2, device_name="NVIDIA A100-SXM4-80GB") == pytest.approx(
        0.5)
    assert mfu(100.0, 1e12, peak_tflops=200.0) == pytest.approx(0.5)
