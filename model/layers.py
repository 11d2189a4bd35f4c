"""Building blocks shared by GPT-2 and the T5-style encoder-decoder.

All attention goes through ``F.scaled_dot_product_attention`` (SDPA) so PyTorch can pick a
fused kernel (flash / memory-efficient on GPU, a fused CPU kernel otherwise), except attention
within documents on CUDA (``DocumentMask``), which uses FlexAttention's block-sparse kernel.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # FlexAttention (torch >= 2.5): block-sparse attention for packed documents on CUDA
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # older torch: packed documents use SDPA with a dense mask everywhere
    BlockMask = create_block_mask = flex_attention = None  # type: ignore[assignment,misc]


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of every token inside its segment: ``(B, T)`` ids -> ``(B, T)`` 0, 1, ... that
    restart wherever the id changes (segments are contiguous runs)."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)  # (B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T)
    return idx - first


@functools.cache
def _compiled_flex():
    # Without torch.compile FlexAttention runs a slow reference path; compile it once.
    return torch.compile(flex_attention, dynamic=False)


class DocumentMask:
    """Causal attention that never crosses a segment (packed examples, documents): query t
    may attend to key s only if ``s <= t`` and both carry the same segment id.

    Built once per forward and shared by every layer. ``flex=True`` (the default on CUDA when
    FlexAttention exists) builds a block mask whose fully masked tiles are skipped; otherwise a
    dense boolean ``(B, 1, T, T)`` mask goes to SDPA (CPU, or dropout, which FlexAttention
    lacks). Every query sees at least itself, so no row is fully masked and nothing is NaN.
    """

    def __init__(self, segment_ids: torch.Tensor, flex: bool | None = None) -> None:
        B, T = segment_ids.shape
        if flex is None:
            flex = segment_ids.is_cuda and flex_attention is not None
        self.block: BlockMask | None = None
        self.dense: torch.Tensor | None = None
        if flex:
            seg = segment_ids

            def same_document_causal(b, h, q, kv):
                return (seg[b, q] == seg[b, kv]) & (q >= kv)

            self.block = create_block_mask(same_document_causal, B, None, T, T,
                                           device=seg.device)
        else:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
            self.dense = (same & causal)[:, None]  # (B, 1, T, T)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
               ) -> torch.Tensor:
        if self.block is not None:
            assert dropout_p == 0.0, "FlexAttention has no dropout; build the mask with flex=False"
            attend = _compiled_flex() if q.is_cuda else flex_attention
            return attend(q, k, v, block_mask=self.block)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense, dropout_p=dropout_p)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (``nn.LayerNorm`` cannot switch the bias off alone)."""

    def __init__(self, ndim: int, bias: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """T5's norm: scale only, no mean subtraction, no bias; statistics in fp32."""

    def __init__(self, ndim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Accumulate the mean square in fp32 even for bf16/fp16 activations (as T5 does).
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = (x.float() * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)
        return self.weight * x


class KVCache:
    """Per-layer key/value cache for incremental decoding.

    ``self_kv[i]`` holds the growing self-attention keys/values of layer ``i``;
    ``cross_kv[i]`` holds the (fixed) cross-attention keys/values computed once from the
    encoder output. Tensors are ``(B, nh, T, hs)``.
    """

    def __init__(self, n_layer: int) -> None:
        self.self_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer
        self.cross_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer

    @property
    def seq_len(self) -> int:
        """Number of positions already cached (same for every layer)."""
        first = self.self_kv[0]
        return 0 if first is None else first[0].size(2)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        past = self.self_kv[layer]
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, T_past + T, hs)
            v = torch.cat([past[1], v], dim=2)
        self.self_kv[layer] = (k, v)
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (used to drop finished sequences)."""
        for kvs in (self.self_kv, self.cross_kv):
            for i, kv in enumerate(kvs):
                if kv is not None:
                    kvs[i] = (kv[0].index_select(0, index), kv[1].index_select(0, index))


class CausalSelfAttention(nn.Module):
    """GPT-2 multi-head causal self-attention (fused QKV projection ``c_attn``)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, layer_idx: int
                 ) -> None:
        super().__init__()
        assert n_embd % n_head == 0
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head = n_head
        self.n_embd = n_embd
        self.dropout = dropout
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | DocumentMask | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """``attn_mask``: bool ``(B, 1, T, T_total)``, True = may attend, or a ``DocumentMask``
        (packed documents). ``None`` means plain causal attention over ``x`` alone (the
        training fast path)."""
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)  # (B, nh, T_total, hs)
        dropout_p = self.dropout if self.training else 0.0
        if isinstance(attn_mask, DocumentMask):
            assert cache is None, "packed documents are a training/evaluation layout"
            y = attn_mask.attend(q, k, v, dropout_p)
        elif attn_mask is None:
            # is_causal assumes queries and keys start at the same position, i.e. no cache.
            assert k.size(2) == T, "causal fast path needs an explicit mask when using a cache"
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): re-assemble heads
        return self.resid_dropout(self.c_proj(y))


class GPT2MLP(nn.Module):
    """GPT-2 feed-forward: 4x expansion with tanh-approximated GELU ("gelu_new")."""

    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class GatedGeluMLP(nn.Module):
    """T5 v1.1 feed-forward: ``wo(gelu(wi_0 x) * wi_1 x)``, no biases."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        return self.wo(self.dropout(h))


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> torch.Tensor:
    """Map ``key_pos - query_pos`` to a bucket id in ``[0, num_buckets)`` (T5 scheme).

    Half of the buckets (per direction) are exact small distances, the other half grow
    logarithmically up to ``max_distance``; everything further shares the last bucket.
    The decoder (``bidirectional=False``) only ever looks back, so future offsets map to 0.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        # Keys to the right of the query use the upper half of the buckets.
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log-spaced bucket for large distances; clamp(min=1) only avoids log(0) in the masked branch
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(
        max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """Learned per-head scalar bias indexed by bucketed relative position (T5)."""

    def __init__(self, num_buckets: int, max_distance: int, n_head: int, bidirectional: bool
                 ) -> None:
        super().__init__()
        self.relative_attention_bias = nn.Embedding(num_buckets, n_head)
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional

    def forward(self, q_len: int, k_len: int, q_offset: int = 0) -> torch.Tensor:
        """Bias ``(1, nh, q_len, k_len)``; queries sit at positions ``q_offset + i``."""
        device = self.relative_attention_bias.weight.device
        q_pos = torch.arange(q_len, device=device)[:, None] + q_offset  # (q_len, 1)
        k_pos = torch.arange(k_len, device=device)[None, :]  # (1, k_len)
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional,
                                           self.num_buckets, self.max_distance)
        values = self.relative_attention_bias(buckets)  # (q_len, k_len, nh)
        return values.permute(2, 0, 1).unsqueeze(0)  # (1, nh, q_len, k_len)


class T5Attention(nn.Module):
    """T5 attention (self or cross). No biases and, unlike GPT-2, no 1/sqrt(d) logit scaling:
    T5 folds that factor into the initialisation of ``q``."""

    def __init__(self, d_model: int, n_head: int, d_kv: int, dropout: float, layer_idx: int
                 ) -> None:
        super().__init__()
        inner = n_head * d_kv
        self.q = nn.Linear(d_model, inner, bias=False)
        self.k = nn.Linear(d_model, inner, bias=False)
        self.v = nn.Linear(d_model, inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)
        self.n_head, self.d_kv, self.dropout, self.layer_idx = n_head, d_kv, dropout, layer_idx

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.d_kv).transpose(1, 2)  # (B, nh, T, d_kv)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, kv_input: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """``bias``: float ``(B or 1, nh, T, T_k)`` = relative position bias + additive mask.
        ``kv_input`` set means cross-attention over it (the encoder output)."""
        B, T, _ = x.shape
        q = self._heads(self.q(x))  # (B, nh, T, d_kv)
        if kv_input is None:  # self-attention
            k, v = self._heads(self.k(x)), self._heads(self.v(x))  # (B, nh, T, d_kv)
            if cache is not None:
                k, v = cache.append(self.layer_idx, k, v)  # (B, nh, T_total, d_kv)
        elif cache is not None and cache.cross_kv[self.layer_idx] is not None:
            # The encoder output is fixed during decoding: project it once, reuse every step.
            k, v = cache.cross_kv[self.layer_idx]  # type: ignore[misc]
        else:
            k, v = self._heads(self.k(kv_input)), self._heads(self.v(kv_input))  # (B, nh, S, d_kv)
            if cache is not None:
                cache.cross_kv[self.layer_idx] = (k, v)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                           dropout_p=dropout_p, scale=1.0)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.d_kv)  # (B, T, inner)
        return self.o(y)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = attend) -> additive float mask. Uses the dtype's min instead of -inf
    so a fully masked row degrades to uniform attention rather than NaN."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, neg)
