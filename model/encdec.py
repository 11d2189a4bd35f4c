"""T5 v1.1-style encoder-decoder, numerically matching HF ``T5ForConditionalGeneration``.

T5 specifics (all reproduced here): RMSNorm without bias, gated-GELU feed-forward, no biases
anywhere, no 1/sqrt(d) attention scaling, a bucketed relative position bias that lives in the
first layer of each stack and is shared by all layers of that stack (none in cross-attention),
and (v1.1) an untied LM head without output scaling.

Loss path::

    loss = model(input_ids, decoder_input_ids, labels=labels)  # scalar, ignore_index=-100
    logits = model(input_ids, decoder_input_ids)               # (B, T_dec, V) float32

If ``decoder_input_ids`` is omitted, it is ``labels`` shifted right with
``decoder_start_token_id`` in front (the T5 convention).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import EncDecConfig
from .layers import GatedGeluMLP, KVCache, RelativePositionBias, RMSNorm, T5Attention, additive_mask

IGNORE_INDEX = -100


class EncoderBlock(nn.Module):
    def __init__(self, cfg: EncDecConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.attn = T5Attention(cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.dropout, layer_idx)
        self.ln_2 = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.mlp = GatedGeluMLP(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), bias))
        x = x + self.drop(self.mlp(self.ln_2(x)))
        return x


class DecoderBlock(nn.Module):
    def __init__(self, cfg: EncDecConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.attn = T5Attention(cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.dropout, layer_idx)
        self.ln_cross = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.cross_attn = T5Attention(cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.dropout,
                                      layer_idx)
        self.ln_2 = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.mlp = GatedGeluMLP(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor, enc: torch.Tensor,
                cross_bias: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), self_bias, cache=cache))
        x = x + self.drop(self.cross_attn(self.ln_cross(x), cross_bias, kv_input=enc, cache=cache))
        x = x + self.drop(self.mlp(self.ln_2(x)))
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: EncDecConfig) -> None:
        super().__init__()
        self.rel_bias = RelativePositionBias(cfg.relative_attention_num_buckets,
                                             cfg.relative_attention_max_distance,
                                             cfg.num_heads, bidirectional=True)
        self.blocks = nn.ModuleList([EncoderBlock(cfg, i) for i in range(cfg.num_layers)])
        self.ln_f = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.checkpointing = cfg.activation_checkpointing


class Decoder(nn.Module):
    def __init__(self, cfg: EncDecConfig) -> None:
        super().__init__()
        assert cfg.num_decoder_layers is not None
        # Causal (one-directional) buckets: the decoder never sees the future.
        self.rel_bias = RelativePositionBias(cfg.relative_attention_num_buckets,
                                             cfg.relative_attention_max_distance,
                                             cfg.num_heads, bidirectional=False)
        self.blocks = nn.ModuleList(
            [DecoderBlock(cfg, i) for i in range(cfg.num_decoder_layers)])
        self.ln_f = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)


class EncoderDecoder(nn.Module):
    def __init__(self, config: EncDecConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        V = config.padded_vocab_size
        self.shared = nn.Embedding(V, config.d_model)  # shared by encoder and decoder inputs
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.lm_head = nn.Linear(config.d_model, V, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """T5 / Mesh-TF initialisation: every matrix N(0, 1/fan_in), except ``q`` which also
        absorbs the 1/sqrt(d_kv) that T5 leaves out of the attention logits."""
        c = self.config
        nn.init.normal_(self.shared.weight, std=1.0)
        if not c.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=c.d_model**-0.5)
        for m in self.modules():
            if isinstance(m, T5Attention):
                nn.init.normal_(m.q.weight, std=(c.d_model * c.d_kv) ** -0.5)
                nn.init.normal_(m.k.weight, std=c.d_model**-0.5)
                nn.init.normal_(m.v.weight, std=c.d_model**-0.5)
                nn.init.normal_(m.o.weight, std=c.inner_dim**-0.5)
            elif isinstance(m, GatedGeluMLP):
                nn.init.normal_(m.wi_0.weight, std=c.d_model**-0.5)
                nn.init.normal_(m.wi_1.weight, std=c.d_model**-0.5)
                nn.init.normal_(m.wo.weight, std=c.d_ff**-0.5)
            elif isinstance(m, RelativePositionBias):
                nn.init.normal_(m.relative_attention_bias.weight, std=c.d_model**-0.5)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count without vocabulary padding rows. ``exclude_embeddings`` drops the
        input embedding table (an untied LM head is a real matmul and stays counted)."""
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        pad_rows = c.padded_vocab_size - c.total_vocab_size
        n -= pad_rows * c.d_model * (1 if c.tie_word_embeddings else 2)
        if exclude_embeddings:
            n -= c.total_vocab_size * c.d_model
        return n

    # ------------------------------------------------------------------ encoder / decoder
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> torch.Tensor:
        """``(B, S)`` ids (+ ``(B, S)`` 1/0 mask) -> encoder output ``(B, S, d_model)``."""
        enc = self.encoder
        S = input_ids.size(1)
        x = enc.drop(self.shared(input_ids))  # (B, S, d)
        # Computed once (layer 0's table in HF naming) and shared by every layer, as in T5.
        bias = enc.rel_bias(S, S)  # (1, nh, S, S)
        if attention_mask is not None:
            bias = bias + additive_mask(attention_mask.bool()[:, None, None, :], bias.dtype)
        use_ckpt = self.config.activation_checkpointing and self.training
        for block in enc.blocks:
            x = checkpoint(block, x, bias, use_reentrant=False) if use_ckpt else block(x, bias)
        return enc.drop(enc.ln_f(x))

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_out: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Decoder ids ``(B, T)`` -> logits ``(B, T, vocab_size + n_sentinels)`` float32.

        With ``cache``, ``decoder_input_ids`` are the new tokens only; cross-attention K/V are
        computed from ``encoder_out`` on the first call and reused afterwards."""
        return self.logits(self.decoder_hidden_states(
            decoder_input_ids, encoder_out, encoder_attention_mask, decoder_attention_mask, cache))

    def decoder_hidden_states(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_out: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The decoder's final norm output ``(B, T, d_model)`` (see ``decode``); ``logits``
        turns it into logits."""
        dec, cfg = self.decoder, self.config
        T = decoder_input_ids.size(1)
        past = cache.seq_len if cache is not None else 0
        device = decoder_input_ids.device
        x = dec.drop(self.shared(decoder_input_ids))  # (B, T, d)

        self_bias = dec.rel_bias(T, past + T, q_offset=past)  # (1, nh, T, past + T)
        q_idx = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
        k_idx = torch.arange(past + T, device=device)[None, :]  # (1, past + T)
        allowed = (k_idx <= q_idx)[None, None]  # (1, 1, T, past + T)
        if decoder_attention_mask is not None:
            allowed = allowed & decoder_attention_mask.bool()[:, None, None, -(past + T):]
        self_bias = self_bias + additive_mask(allowed, self_bias.dtype)
        # Cross-attention has no position bias in T5, only the encoder padding mask.
        S = encoder_out.size(1)
        if encoder_attention_mask is not None:
            cross_bias = additive_mask(encoder_attention_mask.bool()[:, None, None, :],
                                       self_bias.dtype)  # (B, 1, 1, S)
        else:
            cross_bias = self_bias.new_zeros(1, 1, 1, S)

        use_ckpt = cfg.activation_checkpointing and self.training and cache is None
        for block in dec.blocks:
            if use_ckpt:
                x = checkpoint(block, x, self_bias, encoder_out, cross_bias, None,
                               use_reentrant=False)
            else:
                x = block(x, self_bias, encoder_out, cross_bias, cache)
        return dec.drop(dec.ln_f(x))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder hidden states ``(..., d_model)`` -> logits ``(..., V)`` float32."""
        cfg = self.config
        if cfg.tie_word_embeddings:
            # T5 v1.0 convention (HF scale_decoder_outputs): rescale before the tied head.
            hidden = hidden * cfg.d_model**-0.5
        return self.lm_head(hidden)[..., : cfg.total_vocab_size].float()  # (..., V)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder inputs: ``[start, labels[:-1]]`` with -100 -> pad."""
        start = self.config.decoder_start_token_id
        assert start is not None
        shifted = labels.new_full(labels.shape, start)  # (B, T)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_token_id)

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, T_dec, V)`` float32; with ``labels`` the scalar loss instead (or
        ``(logits, loss)`` with ``return_logits=True``)."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        enc = self.encode(input_ids, attention_mask)
        logits = self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask)
        if labels is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)
        return (logits, loss) if return_logits else loss

    def new_cache(self) -> KVCache:
        assert self.config.num_decoder_layers is not None
        return KVCache(self.config.num_decoder_layers)
