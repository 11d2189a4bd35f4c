"""``sft``: supervised fine-tuning of a decoder-only model on packed examples.

The units are windows of whole examples (pipeline/data/packing.py, data/examples.py). In a
window of ``seq_len`` positions the examples sit back to back, each as its tokens but the last
(inputs) and all but the first (targets), followed by padding:

    input_ids    p p p r r r | p p r r | pad pad
    labels       - - r r r E | - r r E |  -   -      (- = no loss, E = the example's EOT)
    segment_ids  0 0 0 0 0 0 | 1 1 1 1 | -1  -1

Only targets under the store's loss mask carry loss (the response or target tokens and the
final EOT); attention stays inside an example (block-diagonal causal, model/layers.py
``DocumentMask``) and positions restart at 0 at each example, so an example in a window gives
the logits it gives alone. ``zeroforge sample --prompt`` renders the prompt through the store's
template (data_prep/examples.py), so the model sees what it saw before its responses in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tiktoken
import torch
from zeroforge.data_prep.examples import Template
from zeroforge.data_prep.store import SplitReader
from zeroforge.pipeline.data.examples import Example, PackedUnits
from zeroforge.pipeline.tasks.base import IGNORE_INDEX, Layout, Task, Units, to_device

PAD_SEGMENT = -1  # the padding after a window's last example: a segment of its own


def pack_window(examples: Sequence[Example], seq_len: int, pad_id: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input ids, labels, segment ids), each ``(seq_len,)``, of one window of examples."""
    inputs = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    segments = np.full(seq_len, PAD_SEGMENT, dtype=np.int64)
    pos = 0
    for k, (tokens, mask) in enumerate(examples):
        n = len(tokens) - 1
        assert pos + n <= seq_len, "packing put more into a window than it holds"
        tokens = tokens.astype(np.int64)
        inputs[pos:pos + n] = tokens[:-1]
        labels[pos:pos + n] = np.where(mask[1:] == 1, tokens[1:], IGNORE_INDEX)
        segments[pos:pos + n] = k
        pos += n
    return inputs, labels, segments


class SupervisedFineTuning(Task):
    name = "sft"
    store_formats = ("sft", "pairs")  # pairs: the source is the prompt, the target the response
    unit_name = "packed window"
    echo_prompt = False  # the output is a response to the prompt, not its continuation

    def make_layout(self) -> Layout:
        n = self.data.seq_len
        return Layout(read_len=n + 1, stride=n, input_len=n)

    def units(self, split: SplitReader, seed: int, store: int) -> Units:
        return PackedUnits(split, self.data.seq_len, seed, store)

    def batch(self, windows: Sequence[list[Example]], sample_ids: Sequence[int], seed: int,
              stream: int) -> dict[str, torch.Tensor]:
        assert self.special.eos is not None, "sft pads with the model's EOT id"
        rows = [pack_window(w, self.data.seq_len, self.special.eos) for w in windows]
        inputs, labels, segments = (np.stack(col) for col in zip(*rows, strict=True))
        return {
            "input_ids": torch.from_numpy(inputs),  # (B, T)
            "labels": torch.from_numpy(labels),  # (B, T): -100 where no loss
            "segment_ids": torch.from_numpy(segments),  # (B, T)
            "sample_ids": torch.as_tensor(np.asarray(sample_ids, dtype=np.int64)),
        }

    def logits_and_labels(self, model: Any, batch: dict[str, torch.Tensor], device: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(to_device(batch["input_ids"], device),
                       segment_ids=to_device(batch["segment_ids"], device))
        return logits, to_device(batch["labels"], device)

    def order_identity(self) -> dict[str, Any]:
        return {"examples": self.examples}

    @property
    def template(self) -> Template | None:
        """The store's template; None for a pairs store (the prompt is the source as it is)."""
        described = (self.examples or {}).get("template")
        return Template.from_json(described) if described else None

    def prompt_ids(self, text: str, enc: tiktoken.Encoding) -> list[int]:
        """The prompt as a user turn of the store's template, up to where the response begins:
        the pieces are encoded one by one, exactly as the store encoded them."""
        template = self.template
        pieces = template.prompt(text) if template is not None else [(text, False)]
        return [i for piece, _ in pieces for i in enc.encode_ordinary(piece)] or [enc.eot_token]
