"""Autoregressive generation for GPT-2 and the encoder-decoder, with a KV cache.

GPT-2 prompts of different lengths are left-padded; the padding keys are masked and position
ids start at 0 at each prompt's first real token, so a batched prompt gives the same result as
running it alone. Encoder-decoder prompts are encoder inputs (right-padded, masked); the
encoder runs once and decoding reuses self-attention K/V plus the cached cross-attention K/V.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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


@dataclass
class Sampling:
    """How the next token is picked (see ``sample_next``) and when a sequence ends."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None  # None: the model config's eos_token_id
    stop_at_eos: bool = True
    seed: int | None = None
    generator: torch.Generator | None = None
    use_cache: bool = True  # False recomputes the whole sequence each step (reference path)
    # Ends a sequence early: called with a sequence's new tokens after each step, True = done
    # (its output keeps the tokens so far). Downstream evaluation stops at stop strings so.
    stop: Callable[[list[int]], bool] | None = None


@contextlib.contextmanager
def _generation(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                opts: Sampling) -> Iterator[tuple[int | None, dict, torch.device]]:
    """Checks the arguments, resolves EOS and the generator, and keeps dropout off meanwhile."""
    _check_args(prompts, max_new_tokens, opts.temperature, opts.top_k, opts.top_p)
    eos_id = opts.eos_id if opts.eos_id is not None else model.config.eos_token_id
    if not opts.stop_at_eos:
        eos_id = None
    device = next(model.parameters()).device
    generator = opts.generator
    if generator is None and opts.seed is not None:
        generator = torch.Generator(device=device).manual_seed(opts.seed)
    pick = {"do_sample": opts.do_sample, "temperature": opts.temperature, "top_k": opts.top_k,
            "top_p": opts.top_p, "generator": generator}
    was_training = model.training
    model.eval()
    try:
        yield eos_id, pick, device
    finally:
        model.train(was_training)


def pad_batch(prompts: Sequence[Sequence[int]], pad_id: int, left: bool,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=device)  # (B, L)
    mask = torch.zeros((len(prompts), L), dtype=torch.long, device=device)  # (B, L)
    for i, p in enumerate(prompts):
        sl = slice(L - len(p), L) if left else slice(0, len(p))
        ids[i, sl] = torch.tensor(list(p), dtype=torch.long, device=device)
        mask[i, sl] = 1
    return ids, mask


class _Finish:
    """Which sequences are done (EOS, or ``Sampling.stop``) and how many tokens each keeps."""

    def __init__(self, B: int, eos_id: int | None, stop: Callable[[list[int]], bool] | None,
                 device: torch.device) -> None:
        self.eos_id, self.stop = eos_id, stop
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.kept = [-1] * B  # tokens kept by a finished sequence; -1: still going
        self.steps: list[torch.Tensor] = []

    def add(self, nxt: torch.Tensor) -> bool:
        """Record the step's ``(B,)`` tokens; True when every sequence is done."""
        if self.eos_id is not None:
            nxt = nxt.masked_fill(self.done, self.eos_id)  # finished rows just repeat EOS
            newly = ~self.done & (nxt == self.eos_id)
            self.done = self.done | newly
            for i in newly.nonzero().flatten().tolist():
                self.kept[i] = len(self.steps) + 1  # EOS included
        self.steps.append(nxt)
        if self.stop is not None:
            rows = None
            for i in (~self.done).nonzero().flatten().tolist():
                rows = rows if rows is not None else torch.stack(self.steps, dim=1).tolist()
                if self.stop(rows[i]):
                    self.done[i] = True
                    self.kept[i] = len(self.steps)
        return bool(self.done.all())

    def outputs(self) -> list[list[int]]:
        if not self.steps:
            return [[] for _ in self.kept]
        toks = torch.stack(self.steps, dim=1).tolist()  # (B, n_steps)
        return [row if k < 0 else row[:k] for row, k in zip(toks, self.kept, strict=True)]


@torch.no_grad()
def generate_gpt2(model: GPT2, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  opts: Sampling | None = None) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns only the new tokens.

    Greedy unless ``opts.do_sample``. A sequence stops after emitting EOS, which is included
    in its output."""
    opts = opts or Sampling()
    with _generation(model, prompts, max_new_tokens, opts) as (eos_id, pick, device):
        finish = _Finish(len(prompts), eos_id, opts.stop, device)
        return _gpt2_loop(model, prompts, max_new_tokens, finish, opts.use_cache, pick, device)


def _gpt2_loop(model: GPT2, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               finish: _Finish, use_cache: bool, pick: dict, device: torch.device
               ) -> list[list[int]]:
    cfg = model.config
    longest = max(len(p) for p in prompts)
    # The last new token is sampled, never fed back: the model sees at most
    # longest + max_new_tokens - 1 positions.
    if longest + max_new_tokens - 1 > cfg.n_positions:
        raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) - 1 exceeds "
                         f"n_positions={cfg.n_positions}")
    pad_id = finish.eos_id if finish.eos_id is not None else 0  # any id: pads are masked out
    ids, mask = pad_batch(prompts, pad_id, left=True, device=device)  # (B, L)
    cache = model.new_cache() if use_cache else None
    step_input = ids
    for _ in range(max_new_tokens):
        feed = step_input if use_cache else ids
        # The LM head at the last position only: at a small width it is most of a step's
        # FLOPs, and a prompt's first step would otherwise run it at every prompt position.
        hidden = model.hidden_states(feed, attention_mask=mask, cache=cache)[:, -1]  # (B, C)
        logits = model.logits(hidden)  # (B, V)
        if finish.add(sample_next(logits, **pick)):  # (B,) tokens
            break
        nxt = finish.steps[-1]
        ids = torch.cat([ids, nxt[:, None]], dim=1)  # (B, L + step)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
        step_input = nxt[:, None]  # (B, 1)
    return finish.outputs()


@torch.no_grad()
def generate_encdec(model: EncoderDecoder, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    opts: Sampling | None = None) -> list[list[int]]:
    """Decode up to ``max_new_tokens`` tokens for each encoder input in ``prompts``; returns the
    decoder's tokens (EOS included where it stopped)."""
    opts = opts or Sampling()
    with _generation(model, prompts, max_new_tokens, opts) as (eos_id, pick, device):
        finish = _Finish(len(prompts), eos_id, opts.stop, device)
        return _encdec_loop(model, prompts, max_new_tokens, finish, opts.use_cache, pick, device)


def _encdec_loop(model: EncoderDecoder, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 finish: _Finish, use_cache: bool, pick: dict, device: torch.device
                 ) -> list[list[int]]:
    cfg = model.config
    src, src_mask = pad_batch(prompts, cfg.pad_token_id, left=False, device=device)  # (B, S)
    B = src.size(0)
    enc = model.encode(src, src_mask)  # (B, S, d): encoded once
    assert cfg.decoder_start_token_id is not None
    dec = torch.full((B, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
    cache = model.new_cache() if use_cache else None
    step_input = dec
    for _ in range(max_new_tokens):
        feed = step_input if use_cache else dec
        logits = model.decode(feed, enc, src_mask, cache=cache)[:, -1]  # (B, V)
        if finish.add(sample_next(logits, **pick)):
            break
        nxt = finish.steps[-1]
        dec = torch.cat([dec, nxt[:, None]], dim=1)  # (B, 1 + step)
        step_input = nxt[:, None]
    return finish.outputs()
