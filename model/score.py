"""Log-probabilities of continuations, for GPT-2 and the encoder-decoder (downstream evaluation).

A request is ``(context ids, continuation ids)``; the answer is the continuation's summed
log-probability given the context and whether greedy decoding would produce exactly it. The
layouts are those of lm-evaluation-harness' Hugging Face backend, so the numbers agree with it:

- GPT-2 (``causal``): context and continuation run as one sequence, cut from the left to the
  last ``max_length + 1`` tokens, the final token dropped (nothing predicts after it).
- encoder-decoder (``seq2seq``): the context (its last ``max_length`` tokens) is the encoder
  input, the continuation the decoder's labels behind the decoder start token.

The LM head runs only at the positions that are scored: with a 50k vocabulary and a small
width it is most of a forward pass, and a multiple-choice context is far longer than its answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .encdec import EncoderDecoder
from .generate import pad_batch
from .gpt2 import GPT2

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


def _answers(model_logits: torch.Tensor, targets: list[list[int]]) -> list[tuple[float, bool]]:
    """``(N, V)`` logits of every scored position (rows back to back) -> one answer per row."""
    logp = F.log_softmax(model_logits.float(), dim=-1)  # (N, V)
    flat = torch.tensor([t for row in targets for t in row], device=logp.device)  # (N,)
    picked = logp.gather(1, flat[:, None]).squeeze(1)  # (N,)
    greedy = logp.argmax(dim=-1) == flat  # (N,)
    out, at = [], 0
    for row in targets:
        n = len(row)
        out.append((float(picked[at:at + n].sum()), bool(greedy[at:at + n].all())))
        at += n
    return out


@torch.no_grad()
def score_gpt2(model: GPT2, requests: Sequence[Request], max_length: int
               ) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), greedy)`` for each request, in one batch."""
    device = next(model.parameters()).device
    rows = [(list(ctx) + list(cont))[-(max_length + 1):][:-1] for ctx, cont in requests]
    T = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), T), dtype=torch.long, device=device)  # (B, T), right-padded
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long, device=device)
    # Right padding needs no mask: causal attention keeps pads out of every real position.
    hidden = model.hidden_states(ids)  # (B, T, C)
    # Position t predicts token t + 1: the continuation's n tokens are predicted at the last n
    # positions of the row.
    b_idx, t_idx = [], []
    for i, (r, (_, cont)) in enumerate(zip(rows, requests, strict=True)):
        n = len(cont)
        b_idx += [i] * n
        t_idx += range(len(r) - n, len(r))
    scored = hidden[torch.tensor(b_idx, device=device), torch.tensor(t_idx, device=device)]
    return _answers(model.logits(scored), [list(cont) for _, cont in requests])  # (N, C) -> V


@torch.no_grad()
def score_encdec(model: EncoderDecoder, requests: Sequence[Request], max_length: int
                 ) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), greedy)`` for each request, in one batch."""
    cfg = model.config
    device = next(model.parameters()).device
    sources = [list(ctx)[-max_length:] for ctx, _ in requests]
    targets = [list(cont)[-max_length:] for _, cont in requests]
    src, src_mask = pad_batch(sources, cfg.pad_token_id, left=False, device=device)  # (B, S)
    assert cfg.decoder_start_token_id is not None
    # Teacher forcing: [start, continuation[:-1]], right-padded (pads come after every scored
    # position, and the decoder is causal).
    dec_in = [[cfg.decoder_start_token_id, *t[:-1]] for t in targets]
    dec, _ = pad_batch(dec_in, cfg.pad_token_id, left=False, device=device)  # (B, T)
    hidden = model.decoder_hidden_states(dec, model.encode(src, src_mask), src_mask)  # (B, T, d)
    b_idx = [i for i, t in enumerate(targets) for _ in t]
    t_idx = [j for t in targets for j in range(len(t))]
    scored = hidden[torch.tensor(b_idx, device=device), torch.tensor(t_idx, device=device)]
    return _answers(model.logits(scored), targets)
