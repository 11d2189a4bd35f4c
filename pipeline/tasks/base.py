"""What every task provides, and the shapes they share.

A task cuts a split's token stream into fixed windows (``Layout``: ``read_len`` tokens every
``stride`` tokens), turns a list of windows into a batch of CPU tensors, and computes its loss
from a batch with the model's own forward signature. Batches are pure functions of the windows
and ``(seed, stream, sample id)``, so they do not depend on the rank or thread that builds them.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F
from zeroforge.pipeline.data.config import DataConfig

IGNORE_INDEX = -100  # label value that carries no loss (the models' cross-entropy ignores it)


def to_device(tensor: torch.Tensor, device: str) -> torch.Tensor:
    """A batch tensor on the model's device, queued without waiting for the device: the loader
    pins training batches on CUDA, so the copy overlaps the work already queued (a blocking
    copy would make the host wait for it, a sync per micro-batch)."""
    return tensor.to(device, non_blocking=True)


@dataclass(frozen=True)
class SpecialIds:
    """The model's special token ids that tasks need (from the family, pipeline/registry.py)."""

    eos: int | None
    pad: int | None = None
    decoder_start: int | None = None
    sentinels: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Layout:
    """How a task cuts windows out of a split, and what one example feeds the model."""

    read_len: int  # tokens read per window
    stride: int  # window w starts at token w * stride
    input_len: int  # tokens into the first stack (decoder-only: the sequence; else: encoder)
    target_len: int = 0  # decoder tokens of an encoder-decoder example; 0 for decoder-only

    @property
    def tokens_per_example(self) -> int:
        return self.input_len + self.target_len

    def windows(self, n_tokens: int) -> int:
        """Windows per epoch in a split of ``n_tokens`` tokens."""
        return max(0, (n_tokens - (self.read_len - self.stride)) // self.stride)


class Task(abc.ABC):
    """One training objective, bound to a run's ``data`` settings and the model's special ids.

    Subclasses set ``name`` (the value of the run config's ``task`` key) and implement the
    abstract methods; ``layout`` is computed once, when the task is built.
    """

    name: ClassVar[str]
    # ``zeroforge sample`` prints the prompt before the output when the output continues it.
    echo_prompt: ClassVar[bool] = True

    def __init__(self, data: DataConfig, special: SpecialIds) -> None:
        self.data, self.special = data, special
        self.layout = self.make_layout()

    @abc.abstractmethod
    def make_layout(self) -> Layout:
        """The window geometry; raises ConfigError naming the ``data.*`` key that does not fit."""

    @abc.abstractmethod
    def batch(self, windows: Sequence[np.ndarray], sample_ids: Sequence[int], seed: int,
              stream: int) -> dict[str, torch.Tensor]:
        """One batch of int64 CPU tensors from raw windows; always includes ``sample_ids``.
        Randomness (span masks) comes from ``(seed, stream, sample id)`` alone."""

    @abc.abstractmethod
    def logits_and_labels(self, model: Any, batch: dict[str, torch.Tensor], device: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, T, V), labels (B, T))`` of a batch, for evaluation."""

    @abc.abstractmethod
    def loss(self, model: Any, batch: dict[str, torch.Tensor], device: str) -> torch.Tensor:
        """Mean token loss of a batch through the model's own loss path (training)."""

    @abc.abstractmethod
    def prompt_ids(self, text: str, enc: tiktoken.Encoding) -> list[int]:
        """Model input for a text prompt (``zeroforge sample``, samples during training)."""

    def order_identity(self) -> dict[str, Any]:
        """Settings besides the stores and seed that change which tokens a sample holds; a
        resume refuses to continue if they changed."""
        return {}

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor], device: str
                 ) -> tuple[torch.Tensor, int]:
        """(summed token loss as a float64 tensor, number of loss tokens) of a batch."""
        logits, labels = self.logits_and_labels(model, batch, device)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss.double(), int((labels != IGNORE_INDEX).sum())
