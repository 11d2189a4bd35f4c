"""GPT-2 (decoder-only, pre-LN) in the nanoGPT style, with GPT-2 parameter names.

Loss path used by the training loop::

    loss = model(x, targets=y)           # scalar mean cross-entropy, ignore_index=-100
    logits = model(x)                    # (B, T, vocab_size + n_sentinels), float32
    logits, loss = model(x, targets=y, return_logits=True)

``targets`` are already shifted (``y[t]`` is the token after ``x[t]``), as in nanoGPT.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import GPT2Config
from .layers import (
    GPT2MLP,
    CausalSelfAttention,
    DocumentMask,
    KVCache,
    LayerNorm,
    segment_positions,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.dropout,
                                        config.bias, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps)
        self.mlp = GPT2MLP(config.n_embd, config.dropout, config.bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | DocumentMask | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        config.validate()
        self.config = config
        V = config.padded_vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        # Tied input/output embeddings (GPT-2). Padded rows are never produced as inputs and
        # their logits are sliced away, so they receive no gradient and change nothing.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2L)
        # (two residual additions per layer) so the residual variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    # ------------------------------------------------------------------ parameters
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights once, vocabulary padding rows excluded).

        ``exclude_embeddings`` drops token and position embeddings (Kaplan et al.'s N)."""
        n = sum(p.numel() for p in self.parameters())
        pad_rows = self.config.padded_vocab_size - self.config.total_vocab_size
        n -= pad_rows * self.config.n_embd
        if exclude_embeddings:
            n -= self.config.total_vocab_size * self.config.n_embd
            n -= self.transformer.wpe.weight.numel()
        return n

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the model.

        Args:
            input_ids: ``(B, T)`` token ids.
            targets: ``(B, T)`` next-token ids (``-100`` = ignore). If given, returns the mean
                cross-entropy loss (scalar) instead of logits.
            attention_mask: ``(B, T_past + T)``, 1 = real token, 0 = padding (generation with
                left-padded prompts). ``None`` = all real.
            position_ids: ``(B, T)``; default derived from ``attention_mask`` so each
                sequence's first real token gets position 0, or from ``segment_ids``.
            segment_ids: ``(B, T)`` document ids of packed sequences (contiguous runs): attention
                stays within a document (block-diagonal causal, ``DocumentMask``) and positions
                restart at 0 at each document's first token. Not with a cache.
            cache: ``KVCache`` for incremental decoding (appended in place).
            return_logits: with ``targets``, return ``(logits, loss)``.
        Returns:
            logits ``(B, T, vocab_size + n_sentinels)`` float32, or loss, or both.
        """
        x = self.hidden_states(input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, segment_ids=segment_ids, cache=cache)
        logits = self.logits(x)  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)
        return (logits, loss) if return_logits else loss

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The final layer norm's output ``(B, T, n_embd)``; ``logits`` turns it into logits.
        Scoring a few positions of a long sequence (downstream evaluation) applies the LM head
        to those positions only: at a small width the head is most of the FLOPs."""
        cfg = self.config
        B, T = input_ids.shape  # (B, T)
        past = cache.seq_len if cache is not None else 0
        if past + T > cfg.n_positions:
            raise ValueError(f"sequence length {past + T} exceeds n_positions={cfg.n_positions}")
        device = input_ids.device

        if segment_ids is not None and (cache is not None or attention_mask is not None):
            raise ValueError("segment_ids (packed documents) go without attention_mask and cache")
        if position_ids is None:
            if segment_ids is not None:
                position_ids = segment_positions(segment_ids)  # (B, T)
            elif attention_mask is not None:
                # Left padding: count real tokens so far; pads get position 0 (masked anyway).
                pos = attention_mask.long().cumsum(-1) - 1  # (B, T_past + T)
                position_ids = pos.clamp(min=0)[:, past:]  # (B, T)
            else:
                position_ids = torch.arange(past, past + T, device=device).unsqueeze(0)  # (1, T)

        attn_mask: torch.Tensor | DocumentMask | None = None
        if segment_ids is not None:
            # FlexAttention has no dropout: with dropout on, train through the dense SDPA mask.
            dropout_on = self.training and cfg.dropout > 0
            attn_mask = DocumentMask(segment_ids, flex=False if dropout_on else None)
        elif attention_mask is not None or past > 0:
            attn_mask = self._build_mask(attention_mask, B, T, past, device)

        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # (B, T, C)
        x = self.transformer.drop(x)
        use_ckpt = cfg.activation_checkpointing and self.training and cache is None
        for block in self.transformer.h:
            if use_ckpt:
                # Recompute the block in backward instead of storing its activations.
                x = checkpoint(block, x, attn_mask, None, use_reentrant=False)
            else:
                x = block(x, attn_mask, cache)
        return self.transformer.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., n_embd)`` hidden states -> ``(..., vocab_size + n_sentinels)`` float32."""
        # Padding the vocab only speeds up the matmul; drop the padded columns right away.
        return self.lm_head(hidden)[..., : self.config.total_vocab_size].float()

    @staticmethod
    def _build_mask(attention_mask: torch.Tensor | None, B: int, T: int, past: int,
                    device: torch.device) -> torch.Tensor:
        """Bool ``(B, 1, T, past + T)`` mask: causal AND key is a real token."""
        total = past + T
        q_idx = torch.arange(past, total, device=device)[:, None]  # (T, 1)
        k_idx = torch.arange(total, device=device)[None, :]  # (1, total)
        allowed = (k_idx <= q_idx)[None, None]  # (1, 1, T, total)
        if attention_mask is not None:
            assert attention_mask.shape == (B, total), "attention_mask must cover past + new"
            allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, total)
            # A pad query would otherwise see no key at all (NaN); let it see itself.
            allowed = allowed | (k_idx == q_idx)[None, None]
        return allowed

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer)
