"""``t5``: T5 span corruption for the encoder-decoder: length arithmetic, the per-example noise
mask, and the task built on them.

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

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import tiktoken
import torch
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.tasks.base import Layout, Task, to_device

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
        raise ConfigError("; ".join(problems))
    raw_len = encoder_len  # corrupted input is never longer than the raw window
    while corrupted_lengths(raw_len + 1, noise_density, mean_span_length)[0] <= encoder_len:
        raw_len += 1
    enc, dec = corrupted_lengths(raw_len, noise_density, mean_span_length)
    n_noise, n_spans = _noise_and_spans(raw_len, noise_density, mean_span_length)
    if enc != encoder_len or raw_len - n_noise < n_spans:
        raise ConfigError(
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


SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")

class SpanCorruption(Task):
    name = "t5"
    echo_prompt = False  # the output fills the prompt's sentinels; it does not continue it

    def make_layout(self) -> Layout:
        data, special = self.data, self.special
        raw_len, dec_len = t5_lengths(data.seq_len, data.noise_density, data.mean_span_length)
        needed = n_spans(raw_len, data.noise_density, data.mean_span_length)
        if special.eos is None or special.decoder_start is None:
            raise ConfigError("task t5 needs a model with eos_token_id and decoder_start_token_id")
        if len(special.sentinels) < needed:
            raise ConfigError(
                f"data.seq_len={data.seq_len} with data.noise_density={data.noise_density} and "
                f"data.mean_span_length={data.mean_span_length} makes {needed} noise spans per "
                f"example, but the model has only {len(special.sentinels)} sentinels")
        return Layout(read_len=raw_len, stride=raw_len, input_len=data.seq_len,
                      target_len=dec_len)

    def batch(self, windows: Sequence[np.ndarray], sample_ids: Sequence[int], seed: int,
              stream: int) -> dict[str, torch.Tensor]:
        data, special, layout = self.data, self.special, self.layout
        inputs, labels = [], []
        for raw, g in zip(windows, sample_ids, strict=True):
            enc, dec = corrupt(raw, data.noise_density, data.mean_span_length, special.sentinels,
                               special.eos, example_rng(seed, stream, int(g)))
            assert len(enc) == layout.input_len and len(dec) == layout.target_len
            inputs.append(enc)
            labels.append(dec)
        y = torch.from_numpy(np.stack(labels))  # (B, T_dec)
        # Teacher forcing: the decoder sees the labels shifted right behind the start token
        # (the same one generation starts from).
        dec_in = torch.cat([torch.full_like(y[:, :1], special.decoder_start), y[:, :-1]], dim=1)
        return {
            "input_ids": torch.from_numpy(np.stack(inputs)),  # (B, T_enc)
            "decoder_input_ids": dec_in,  # (B, T_dec)
            "labels": y,  # (B, T_dec)
            "sample_ids": torch.as_tensor(np.asarray(sample_ids, dtype=np.int64)),
        }

    def logits_and_labels(self, model: Any, batch: dict[str, torch.Tensor], device: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(to_device(batch["input_ids"], device),
                       decoder_input_ids=to_device(batch["decoder_input_ids"], device))
        return logits, to_device(batch["labels"], device)

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        # Every label carries loss, pads included when the pad id is EOT (docs/data-loading.md).
        return batch["labels"].numel()

    def order_identity(self) -> dict[str, Any]:
        return {"noise": [self.data.noise_density, self.data.mean_span_length]}

    def prompt_ids(self, text: str, enc: tiktoken.Encoding) -> list[int]:
        """Encoder input: ``<extra_id_K>`` in the text stands for sentinel K (the masks the model
        learnt to fill); a prompt without one gets ``<extra_id_0>`` appended, so the model fills
        in what follows the text."""
        special = self.special
        ids: list[int] = []
        pos = 0
        for m in SENTINEL_RE.finditer(text):
            ids += enc.encode_ordinary(text[pos:m.start()])
            k = int(m.group(1))
            if k >= len(special.sentinels):
                raise ConfigError(f"--prompt: {m.group(0)} but the model has "
                                  f"{len(special.sentinels)} sentinels")
            ids.append(special.sentinels[k])
            pos = m.end()
        ids += enc.encode_ordinary(text[pos:])
        if not set(ids) & set(special.sentinels):
            ids.append(special.sentinels[0])
        return ids
