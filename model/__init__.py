"""zeroforge models: GPT-2 and a T5 v1.1-style encoder-decoder.

The model classes know only their forward pass; generation (``generate``) and Hugging Face
conversion (``hf``) are functions over them, so nothing here imports back into the classes.
"""

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
from .generate import Sampling, generate_encdec, generate_gpt2, sample_next
from .gpt2 import GPT2
from .hf import load_encdec_hf, load_gpt2_hf, save_encdec_hf, save_gpt2_hf
from .layers import KVCache
from .score import score_encdec, score_gpt2
from .sentinels import is_sentinel, sentinel_id, sentinel_ids

__all__ = [
    "GPT2",
    "PEAK_TFLOPS_BF16",
    "EncDecConfig",
    "EncoderDecoder",
    "GPT2Config",
    "KVCache",
    "Sampling",
    "encdec_flops_per_token",
    "encdec_num_params",
    "generate_encdec",
    "generate_gpt2",
    "gpt2_flops_per_token",
    "gpt2_num_params",
    "is_sentinel",
    "load_encdec_hf",
    "load_gpt2_hf",
    "mfu",
    "sample_next",
    "score_encdec",
    "score_gpt2",
    "save_encdec_hf",
    "save_gpt2_hf",
    "sentinel_id",
    "sentinel_ids",
]
