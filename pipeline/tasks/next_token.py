"""``gpt``: next-token prediction over fixed windows of the token stream (GPT-2 pretraining).

A window holds ``seq_len + 1`` tokens and windows overlap by one token (stride ``seq_len``), so
every token but a split's first is a target exactly once per epoch. Documents follow each other
inside a window, separated by the store's EOT, as in GPT-2.

With ``data.document_mask: true`` a window keeps its tokens and targets but attention stays
within documents and positions restart at each one: every EOT in the inputs begins a new
document (it plays the part of a beginning-of-sequence token, as it does when ``zeroforge
sample`` starts from an empty prompt), so the tokens of a document never see the previous one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tiktoken
import torch
from zeroforge.pipeline.tasks.base import Layout, Task, to_device


def document_ids(inputs: np.ndarray, eot: int) -> np.ndarray:
    """``(B, T)`` segment ids: a new document starts at every EOT of the inputs."""
    return np.cumsum(inputs == eot, axis=1)


class NextToken(Task):
    name = "gpt"

    def make_layout(self) -> Layout:
        n = self.data.seq_len
        return Layout(read_len=n + 1, stride=n, input_len=n)

    def batch(self, windows: Sequence[np.ndarray], sample_ids: Sequence[int], seed: int,
              stream: int) -> dict[str, torch.Tensor]:
        x = np.stack(windows).astype(np.int64)  # (B, T+1)
        batch = {
            "input_ids": torch.from_numpy(x[:, :-1].copy()),  # (B, T)
            "targets": torch.from_numpy(x[:, 1:].copy()),  # (B, T): the token after each input
            "sample_ids": torch.as_tensor(np.asarray(sample_ids, dtype=np.int64)),
        }
        if self.data.document_mask:
            assert self.special.eos is not None, "document masking needs the model's EOT id"
            batch["segment_ids"] = torch.from_numpy(document_ids(x[:, :-1], self.special.eos))
        return batch

    def logits_and_labels(self, model: Any, batch: dict[str, torch.Tensor], device: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        seg = batch.get("segment_ids")
        logits = model(to_device(batch["input_ids"], device),
                       segment_ids=None if seg is None else to_device(seg, device))
        return logits, to_device(batch["targets"], device)

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["targets"].numel()  # every target carries loss

    def order_identity(self) -> dict[str, Any]:
        # Only when on: checkpoints of runs without it keep their saved identity.
        return {"document_mask": True} if self.data.document_mask else {}

    def prompt_ids(self, text: str, enc: tiktoken.Encoding) -> list[int]:
        """The text as ordinary tokens (special-token text stays text, as in the token store);
        an empty prompt starts from EOT, a document boundary."""
        return enc.encode_ordinary(text) or [enc.eot_token]
