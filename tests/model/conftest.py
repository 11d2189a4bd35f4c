"""Shared fixtures for the model tests (tiny fp32 configs on CPU)."""

from __future__ import annotations

import pytest
import torch
from zeroforge.model import EncDecConfig, GPT2Config


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: slower tests (still run by default)")


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture
def gpt2_cfg() -> GPT2Config:
    # Small vocab keeps HF parity / generation tests fast; eos inside the vocab.
    return GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_positions=64,
                      eos_token_id=96)


@pytest.fixture
def t5_cfg() -> EncDecConfig:
    return EncDecConfig(d_model=32, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                        d_kv=8, vocab_size=90, n_sentinels=10, relative_attention_num_buckets=8,
                        relative_attention_max_distance=20, pad_token_id=0, eos_token_id=1)
