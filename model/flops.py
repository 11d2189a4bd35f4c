"""Parameter counts, training FLOPs per token and model FLOPs utilisation (MFU).

No torch import: counts come from the config alone, so even ``gpt2-xl`` costs nothing.

Conventions (PaLM appendix B / nanoGPT): a matmul of an (m x k) by (k x n) costs 2mkn FLOPs,
backward costs twice forward, so training costs 3x forward. Norms, softmax, biases, activation
functions and the relative-position-bias lookup are ignored (<1% at these sizes).

GPT-2 (decoder-only), per token at context T::

    6 * N + 12 * L * H * Q * T
    N = non-embedding parameters + the LM head (V * d; tied, but it is a real matmul).
        Position embeddings are a lookup and excluded.
    12 L H Q T = 3 (fwd+bwd) * 2 (QK^T and AV) * 2 (FLOPs per MAC) * L * H*Q * T, counting the
        full T x T score matrix although half of it is masked (as PaLM does).

Encoder-decoder, per *target* (decoder) token with S source tokens and T target tokens per
example (h = H * Q = num_heads * d_kv, L_e / L_d layers)::

    forward FLOPs per example =
        2 * N_enc * S                 encoder matrices see every source token
      + 2 * N_dec * T                 decoder self-attn, cross-attn q/o, FFN see target tokens
      + 2 * N_xkv * S                 cross-attn k/v project the encoder output once
      + 2 * V * d * T                 LM head
      + 4 * h * (L_e * S^2 + L_d * T^2 + L_d * T * S)   attention scores and weighted sums
    N_enc = L_e (4 d h + 3 d d_ff)          (q,k,v,o + gated FFN wi_0, wi_1, wo)
    N_dec = L_d (4 d h + 2 d h + 3 d d_ff)  (self q,k,v,o + cross q,o + FFN)
    N_xkv = L_d (2 d h)
    training FLOPs per target token = 3 * forward / T

With S = T and L_e = L_d this is ~6 N_total + 12 L h (2S + ...) -- i.e. the encoder tokens are
"free riders" that the target-token throughput has to pay for; report throughput in target
tokens when using this number.
"""

from __future__ import annotations

from .config import EncDecConfig, GPT2Config

# Dense bf16 peak (no sparsity), TFLOP/s per device. Override with mfu(peak_tflops=...).
PEAK_TFLOPS_BF16: dict[str, float] = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


def gpt2_num_params(cfg: GPT2Config, exclude_embeddings: bool = False) -> int:
    """Exact parameter count of :class:`model.GPT2` (tied head counted once, no padding)."""
    d, L = cfg.n_embd, cfg.n_layer
    b = 1 if cfg.bias else 0
    per_block = (
        (2 * d if b else d)  # ln_1
        + 3 * d * d + 3 * d * b  # c_attn
        + d * d + d * b  # attn.c_proj
        + (2 * d if b else d)  # ln_2
        + 4 * d * d + 4 * d * b  # c_fc
        + 4 * d * d + d * b  # mlp.c_proj
    )
    n = L * per_block + (2 * d if b else d)  # + ln_f
    if not exclude_embeddings:
        n += cfg.total_vocab_size * d + cfg.n_positions * d
    return n


def gpt2_flops_per_token(cfg: GPT2Config, seq_len: int | None = None) -> float:
    """Training (fwd+bwd) FLOPs per token: ``6N + 12 L H Q T`` (see module docstring)."""
    T = cfg.n_positions if seq_len is None else seq_len
    N = gpt2_num_params(cfg, exclude_embeddings=True) + cfg.total_vocab_size * cfg.n_embd
    return 6.0 * N + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * T


def encdec_num_params(cfg: EncDecConfig, exclude_embeddings: bool = False) -> int:
    """Exact parameter count of :class:`model.EncoderDecoder` (no vocabulary padding).
    ``exclude_embeddings`` drops the input embedding (an untied LM head stays counted)."""
    d, h, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
    Ld = cfg.num_decoder_layers or cfg.num_layers
    rel = cfg.relative_attention_num_buckets * cfg.num_heads
    enc = cfg.num_layers * (4 * d * h + 3 * d * f + 2 * d) + d + rel
    dec = Ld * (8 * d * h + 3 * d * f + 3 * d) + d + rel
    V = cfg.total_vocab_size
    n = enc + dec + (0 if cfg.tie_word_embeddings else V * d)
    if not exclude_embeddings:
        n += V * d
    return n


def encdec_flops_per_token(cfg: EncDecConfig, src_len: int, tgt_len: int) -> float:
    """Training FLOPs per target token for ``src_len`` encoder and ``tgt_len`` decoder tokens
    per example (derivation in the module docstring)."""
    S, T = src_len, tgt_len
    d, h, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
    Le, Ld = cfg.num_layers, cfg.num_decoder_layers or cfg.num_layers
    n_enc = Le * (4 * d * h + 3 * d * f)
    n_dec = Ld * (6 * d * h + 3 * d * f)
    n_xkv = Ld * 2 * d * h
    fwd = 2.0 * (n_enc * S + n_dec * T + n_xkv * S + cfg.total_vocab_size * d * T)
    fwd += 4.0 * h * (Le * S * S + Ld * T * T + Ld * T * S)
    return 3.0 * fwd / T


def peak_tflops_for(device_name: str | None) -> float | None:
    """Look up the bf16 peak by substring (e.g. "NVIDIA H100 80GB HBM3" -> 989)."""
    if not device_name:
        return None
    name = device_name.upper()
    for key, peak in PEAK_TFLOPS_BF16.items():
        if key in name:
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int = 1,
        peak_tflops: float | None = None, device_name: str | None = None) -> float | None:
    """Model FLOPs utilisation in [0, 1].

    ``tokens_per_s`` is the global throughput over all ``n_devices``; ``peak_tflops`` (per
    device) overrides the table lookup by ``device_name``. Returns None if the peak is unknown
    (e.g. CPU)."""
    peak = peak_tflops if peak_tflops is not None else peak_tflops_for(device_name)
    if peak is None or peak <= 0 or n_devices < 1:
        return None
    return tokens_per_s * flops_per_token / (n_devices * peak * 1e12)
