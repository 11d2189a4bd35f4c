"""zeroforge models: GPT-2 and a T5 v1.1-style encoder-decoder."""

from .config import EncDecConfig, GPT2Config
from .encdec import EncoderDecoder
from .flops import (
    PEAK_TFLOPS_BF16,
    encdec_flops_per_token,
    encdec_num_params,
    gpt2_flops_per_token,
    gpt2_num_params,
    mfu,
)
from .generate import generate, sample_next
from .gpt2 import GPT2
from .layers import KVCache
from .sentinels import is_sentinel, sentinel_id, sentinel_ids

__all__ = [
    "GPT2",
    "PEAK_TFLOPS_BF16",
    "EncDecConfig",
    "EncoderDecoder",
    "GPT2Config",
    "KVCache",
    "encdec_flops_per_token",
    "encdec_num_params",
    "generate",
    "gpt2_flops_per_token",
    "gpt2_num_params",
    "is_sentinel",
    "mfu",
    "sample_next",
    "sentinel_id",
    "sentinel_ids",
]
