"""T5 span corruption: length arithmetic and the per-example noise mask.

A raw window of ``raw_len`` tokens is split into alternating non-noise / noise spans, always
starting with non-noise and ending with noise (T5's layout). Then

    inputs  = nonnoise_0 <S0> nonnoise_1 <S1> ... nonnoise_{k-1} <S{k-1}>
    targets = <S0> noise_0 <S1> noise_1 ... <S{k-1}> noise_{k-1} EOT

where ``<Si>`` is ``sentinel_ids[i]``. The final EOT is part of the decoder length budget, so

    n_noise  = round(raw_len * noise_density)            (clamped to [1, raw_len - 1])
    n_spans  = max(1, round(n_noise / mean_span_length))  (at most n_noise)
    encoder  = (raw_len - n_noise) + n_spans
    decoder  = n_noise + n_spans + 1

Unlike T5 we append no EOS to the encoder input: a raw window is an arbitrary slice of the
packed token stream (documents inside it keep their own EOTs), so an extra end marker would be a
fake document boundary and cost one real token per example.

Both lengths depend only on ``raw_len``, so every example of a run has exactly the same shapes
and no padding is needed. The mask of one example is a pure function of ``(seed, stream,
index)`` through a numpy ``Generator`` seeded by a ``SeedSequence``, so it does not depend on the
number of ranks or on which thread builds the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_U64 = (1 << 64) - 1


def _noise_and_spans(
    raw_len: int, noise_density: float, mean_span_length: float
) -> tuple[int, int]:
    n_noise = min(max(1, int(round(raw_len * noise_density))), raw_len - 1)
    n_spans = min(max(1, int(round(n_noise / mean_span_length))), n_noise)
    return n_noise, n_spans


def corrupted_lengths(
    raw_len: int, noise_density: float, mean_span_length: float
) -> tuple[int, int]:
    """(encoder_len, decoder_len) produced from a raw window of ``raw_len`` tokens."""
    n_noise, n_spans = _noise_and_spans(raw_len, noise_density, mean_span_length)
    return raw_len - n_noise + n_spans, n_noise + n_spans + 1


def t5_lengths(encoder_len: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(raw_tokens_per_example, decoder_len) such that the encoder input is exactly ``encoder_len``.

    Same question as T5's ``compute_input_and_target_lengths``: the largest raw length whose
    corrupted input fits. Going from ``raw_len`` to ``raw_len + 1`` changes the encoder length by
    ``1 - d_noise + d_spans`` with ``d_noise, d_spans`` in {0, 1} and ``d_spans <= d_noise``, i.e.
    by 0 or +1, so every encoder length is hit exactly and "fits" means "equals": no padding.
    """
    problems = []
    if encoder_len < 2:
        problems.append(f"data.seq_len must be at least 2 for span corruption, got {encoder_len}")
    if not 0.0 < noise_density < 1.0:
        problems.append(f"data.noise_density must be in (0, 1), got {noise_density}")
    if not mean_span_length >= 1.0:
        problems.append(f"data.mean_span_length must be >= 1, got {mean_span_length}")
    if problems:
        raise ValueError("; ".join(problems))
    raw_len = encoder_len  # corrupted input is never longer than the raw window
    while corrupted_lengths(raw_len + 1, noise_density, mean_span_length)[0] <= encoder_len:
        raw_len += 1
    enc, dec = corrupted_lengths(raw_len, noise_density, mean_span_length)
    n_noise, n_spans = _noise_and_spans(raw_len, noise_density, mean_span_length)
    if enc != encoder_len or raw_len - n_noise < n_spans:
        raise ValueError(
            f"data.seq_len={encoder_len} is too short for span corruption with "
            f"noise_density={noise_density}, mean_span_length={mean_span_length}"
        )
    return raw_len, dec


def n_spans(raw_len: int, noise_density: float, mean_span_length: float) -> int:
    """Noise spans per example = sentinels needed per example."""
    return _noise_and_spans(raw_len, noise_density, mean_span_length)[1]


def example_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The Generator of one example: a pure function of (seed, stream, index)."""
    return np.random.default_rng(np.random.SeedSequence([seed & _U64, stream, index]))


def _segment(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of ``n_items`` into ``n_segments`` non-empty parts."""
    cuts = np.sort(rng.choice(n_items - 1, size=n_segments - 1, replace=False) + 1)
    return np.diff(np.concatenate(([0], cuts, [n_items])))


def noise_mask(
    raw_len: int, noise_density: float, mean_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean (raw_len,) mask, True on noise tokens; non-noise first, noise last."""
    n_noise, spans = _noise_and_spans(raw_len, noise_density, mean_span_length)
    lengths = np.empty(2 * spans, dtype=np.int64)
    lengths[0::2] = _segment(raw_len - n_noise, spans, rng)
    lengths[1::2] = _segment(n_noise, spans, rng)
    is_noise = np.tile(np.array([False, True]), spans)
    return np.repeat(is_noise, lengths)


def _replace_spans(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """Drop the tokens under ``mask``, putting sentinel i where the i-th masked span starts."""
    starts = mask & ~np.concatenate(([False], mask[:-1]))
    span_index = np.cumsum(starts) - 1
    values = np.where(starts, sentinels[np.maximum(span_index, 0)], tokens)
    return values[~mask | starts]


def corrupt(
    raw: np.ndarray,
    noise_density: float,
    mean_span_length: float,
    sentinel_ids: Sequence[int],
    eot_id: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int64 arrays for one raw window; see the module docstring."""
    tokens = raw.astype(np.int64)
    mask = noise_mask(len(tokens), noise_density, mean_span_length, rng)
    sentinels = np.asarray(sentinel_ids, dtype=np.int64)
    inputs = _replace_spans(tokens, mask, sentinels)
    # Replacing the non-noise spans instead gives "<S0> noise_0 <S1> noise_1 ...": the first
    # non-noise span precedes the first noise span, so the sentinel numbering lines up.
    targets = _replace_spans(tokens, ~mask, sentinels)
    return inputs, np.append(targets, np.int64(eot_id))
