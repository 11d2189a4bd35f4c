"""``gpt``: next-token prediction over fixed windows of the token stream (GPT-2 pretraining).

A window holds ``seq_len + 1`` tokens and windows overlap by one token (stride ``seq_len``), so
every token but a split's first is a target exactly once per epoch. Documents follow each other
inside a window, separated by the store's EOT, as in GPT-2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tiktoken
import torch
from zeroforge.pipeline.tasks.base import Layout, Task, to_device


class NextToken(Task):
    name = "gpt"

    def make_layout(self) -> Layout:
        n = self.data.seq_len
        return Layout(read_len=n + 1, stride=n, input_len=n)

    def batch(self, windows: Sequence[np.ndarray], sample_ids: Sequence[int], seed: int,
              stream: int) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(np.stack(windows).astype(np.int64))  # (B, T+1)
        return {
            "input_ids": x[:, :-1].contiguous(),  # (B, T)
            "targets": x[:, 1:].contiguous(),  # (B, T): the token after each input
            "sample_ids": torch.as_tensor(np.asarray(sample_ids, dtype=np.int64)),
        }

    def logits_and_labels(self, model: Any, batch: dict[str, torch.Tensor], device: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        return model(to_device(batch["input_ids"], device)), to_device(batch["targets"], device)

    def loss(self, model: Any, batch: dict[str, torch.Tensor], device: str) -> torch.Tensor:
        return model(to_device(batch["input_ids"], device), to_device(batch["targets"], device))

    def prompt_ids(self, text: str, enc: tiktoken.Encoding) -> list[int]:
        """The text as ordinary tokens (special-token text stays text, as in the token store);
        an empty prompt starts from EOT, a document boundary."""
        return enc.encode_ordinary(text) or [enc.eot_token]
