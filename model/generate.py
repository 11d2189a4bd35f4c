"""Autoregressive generation for GPT-2 and the encoder-decoder, with a KV cache.

GPT-2 prompts of different lengths are left-padded; the padding keys are masked and position
ids start at 0 at each prompt's first real token, so a batched prompt gives the same result as
running it alone. Encoder-decoder prompts are encoder inputs (right-padded, masked); the
encoder runs once and decoding reuses self-attention K/V plus the cached cross-attention K/V.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .encdec import EncoderDecoder
    from .gpt2 import GPT2


def _check_args(prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float | None) -> None:
    problems = []
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        problems.append("prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 0:
        problems.append(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        problems.append(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        problems.append(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        problems.append(f"top_p must be in (0, 1], got {top_p}")
    if problems:
        raise ValueError("invalid generate() arguments: " + "; ".join(problems))


def sample_next(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from ``(B, V)`` logits -> ``(B,)`` ids."""
    if not do_sample or temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token if the tokens ranked above it already reach top_p (keeps >= 1 token).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(
    model: GPT2 | EncoderDecoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    stop_at_eos: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt; returns only the new tokens.

    Greedy unless ``do_sample`` (then ``temperature`` / ``top_k`` / ``top_p`` apply; a
    ``seed`` or explicit ``generator`` makes sampling reproducible). A sequence stops after
    emitting ``eos_id`` (default: ``model.config.eos_token_id``), which is included in its
    output. ``use_cache=False`` recomputes the full sequence each step (reference path).
    """
    from .encdec import EncoderDecoder

    _check_args(prompts, max_new_tokens, temperature, top_k, top_p)
    if eos_id is None:
        eos_id = model.config.eos_token_id
    if not stop_at_eos:
        eos_id = None
    device = next(model.parameters()).device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    pick = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k,
            "top_p": top_p, "generator": generator}

    was_training = model.training
    model.eval()  # dropout off while generating
    try:
        if isinstance(model, EncoderDecoder):
            return _generate_encdec(model, prompts, max_new_tokens, eos_id, use_cache, pick,
                                    device)
        return _generate_gpt2(model, prompts, max_new_tokens, eos_id, use_cache, pick, device)
    finally:
        model.train(was_training)


def _pad_batch(prompts: Sequence[Sequence[int]], pad_id: int, left: bool,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=device)  # (B, L)
    mask = torch.zeros((len(prompts), L), dtype=torch.long, device=device)  # (B, L)
    for i, p in enumerate(prompts):
        sl = slice(L - len(p), L) if left else slice(0, len(p))
        ids[i, sl] = torch.tensor(list(p), dtype=torch.long, device=device)
        mask[i, sl] = 1
    return ids, mask


def _collect(steps: list[torch.Tensor], eos_id: int | None, B: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(B)]
    if not steps:
        return out
    toks = torch.stack(steps, dim=1).tolist()  # (B, n_steps)
    for i, row in enumerate(toks):
        for t in row:
            out[i].append(t)
            if t == eos_id:
                break
    return out


def _generate_gpt2(model: GPT2, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   eos_id: int | None, use_cache: bool, pick: dict, device: torch.device
                   ) -> list[list[int]]:
    cfg = model.config
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.n_positions:
        raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"n_positions={cfg.n_positions}")
    pad_id = eos_id if eos_id is not None else 0  # any id works: pads are masked out
    ids, mask = _pad_batch(prompts, pad_id, left=True, device=device)  # (B, L)
    B = ids.size(0)
    cache = model.new_cache() if use_cache else None
    steps: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_input = ids
    for _ in range(max_new_tokens):
        feed = step_input if use_cache else ids
        logits = model(feed, attention_mask=mask, cache=cache)[:, -1]  # (B, V)
        nxt = sample_next(logits, **pick)  # (B,)
        if eos_id is not None:
            nxt = nxt.masked_fill(done, eos_id)  # finished rows just repeat EOS
            done = done | (nxt == eos_id)
        steps.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)  # (B, L + step)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
        step_input = nxt[:, None]  # (B, 1)
        if eos_id is not None and bool(done.all()):
            break
    return _collect(steps, eos_id, B)


def _generate_encdec(model: EncoderDecoder, prompts: Sequence[Sequence[int]],
                     max_new_tokens: int, eos_id: int | None, use_cache: bool, pick: dict,
                     device: torch.device) -> list[list[int]]:
    cfg = model.config
    src, src_mask = _pad_batch(prompts, cfg.pad_token_id, left=False, device=device)  # (B, S)
    B = src.size(0)
    enc = model.encode(src, src_mask)  # (B, S, d): encoded once
    assert cfg.decoder_start_token_id is not None
    dec = torch.full((B, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
    cache = model.new_cache() if use_cache else None
    steps: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_input = dec
    for _ in range(max_new_tokens):
        feed = step_input if use_cache else dec
        logits = model.decode(feed, enc, src_mask, cache=cache)[:, -1]  # (B, V)
        nxt = sample_next(logits, **pick)
        if eos_id is not None:
            nxt = nxt.masked_fill(done, eos_id)
            done = done | (nxt == eos_id)
        steps.append(nxt)
        dec = torch.cat([dec, nxt[:, None]], dim=1)  # (B, 1 + step)
        step_input = nxt[:, None]
        if eos_id is not None and bool(done.all()):
            break
    return _collect(steps, eos_id, B)
