"""``seq2seq``: source -> target fine-tuning of the encoder-decoder on a pairs store.

A unit is one example (pipeline/data/examples.py ``PairUnits``): the source (the tokens without
loss) goes to the encoder, the target (the loss-bearing tokens, its EOT last) to the decoder
behind the model's ``decoder_start_token_id``. Every global batch is sorted by example length
(``length_aware``, pipeline/data/loader.py), so the examples of a micro-batch have similar
lengths; each micro-batch is padded to its own longest source and target, with padding masks
for the encoder, the cross-attention and the decoder, and loss on target tokens only.
Examples longer than ``data.seq_len`` (source) or ``data.target_len`` (target + EOT) are left
out of the run (counted and logged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tiktoken
import torch
from zeroforge.data_prep.store import SplitReader
from zeroforge.pipeline.data.examples import Example, PairUnits
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.tasks.base import IGNORE_INDEX, Layout, Task, Units, to_device


def split_pair(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) of a pairs example: the mask is 0...0 1...1 (verified by the store)."""
    n_source = len(tokens) - int(mask.sum())
    return tokens[:n_source].astype(np.int64), tokens[n_source:].astype(np.int64)


def _padded(rows: Sequence[np.ndarray], fill: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``(B, L)`` array of the rows and its ``(B, L)`` 1/0 mask."""
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), fill, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return out, mask


class SequenceToSequence(Task):
    name = "seq2seq"
    store_formats = ("pairs",)
    length_aware = True
    echo_prompt = False  # the output answers the source; it does not continue it
    unit_name = "example"

    def make_layout(self) -> Layout:
        if self.special.decoder_start is None or self.special.pad is None:
            raise ConfigError("task seq2seq needs a model with pad_token_id and "
                              "decoder_start_token_id")
        n, t = self.data.seq_len, self.data.target_len
        # Longest example; micro-batches are padded to their own longest, usually less.
        return Layout(read_len=n + t, stride=n + t, input_len=n, target_len=t)

    def units(self, split: SplitReader, seed: int, store: int) -> Units:
        return PairUnits(split, self.data.seq_len, self.data.target_len)

    def batch(self, windows: Sequence[Example], sample_ids: Sequence[int], seed: int,
              stream: int) -> dict[str, torch.Tensor]:
        special = self.special
        pairs = [split_pair(tokens, mask) for tokens, mask in windows]
        src, src_mask = _padded([s for s, _ in pairs], special.pad)
        tgt, tgt_mask = _padded([t for _, t in pairs], special.pad)
        labels = np.where(tgt_mask == 1, tgt, IGNORE_INDEX)
        # Teacher forcing: the decoder sees the target shifted right behind the start token.
        dec_in = np.concatenate([np.full((len(pairs), 1), special.decoder_start), tgt[:, :-1]],
                                axis=1)
        return {
            "input_ids": torch.from_numpy(src),  # (B, S)
            "attention_mask": torch.from_numpy(src_mask),  # (B, S)
            "decoder_input_ids": torch.from_numpy(dec_in),  # (B, T)
            "decoder_attention_mask": torch.from_numpy(tgt_mask),  # (B, T)
            "labels": torch.from_numpy(labels),  # (B, T): -100 on padding
            "sample_ids": torch.as_tensor(np.asarray(sample_ids, dtype=np.int64)),
        }

    def logits_and_labels(self, model: Any, batch: dict[str, torch.Tensor], device: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(to_device(batch["input_ids"], device),
                       decoder_input_ids=to_device(batch["decoder_input_ids"], device),
                       attention_mask=to_device(batch["attention_mask"], device),
                       decoder_attention_mask=to_device(batch["decoder_attention_mask"], device))
        return logits, to_device(batch["labels"], device)

    def order_identity(self) -> dict[str, Any]:
        return {"examples": self.examples, "target_len": self.data.target_len}

    def prompt_ids(self, text: str, enc: tiktoken.Encoding) -> list[int]:
        """The encoder input: the text as a source was stored (ordinary tokens)."""
        assert self.special.eos is not None
        return enc.encode_ordinary(text) or [self.special.eos]
