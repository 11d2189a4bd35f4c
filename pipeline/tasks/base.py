"""What every task provides, and the shapes they share.

A task says what one *unit* of a split is (``units``): a fixed window of the token stream
(``Layout``: ``read_len`` tokens every ``stride`` tokens; pretraining), a packed window of whole
examples (``sft``) or one example (``seq2seq``). The global order (pipeline/data/order.py)
permutes a split's units; the task turns a list of units into a batch of CPU tensors and
computes its loss from a batch with the model's own forward signature. Batches are pure
functions of the units and ``(seed, stream, sample id)``, so they do not depend on the rank or
thread that builds them.

The training loss is a *sum* over loss tokens with their count (``loss_sum``), so the training
step can normalise by the loss-token count of the whole optimizer step (training/step.py).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F
from zeroforge.data_prep.store import SplitReader
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


class Units(Protocol):
    """The units of one split of one store, as a task cuts them: what the global order permutes."""

    dropped: int  # examples left out because they do not fit (logged once by the caller)

    def __len__(self) -> int: ...

    def get(self, i: int) -> Any:
        """Unit ``i``, as the task's ``batch`` takes it."""

    def length(self, i: int) -> int:
        """Tokens of unit ``i`` (length-aware batching sorts by it)."""

    def prefetch(self, i: int) -> None:
        """Read-ahead hint: unit ``i`` is read soon (a remote store starts fetching it)."""


class WindowUnits:
    """Fixed windows of the token stream: ``read_len`` tokens every ``stride``."""

    dropped = 0

    def __init__(self, split: SplitReader, layout: Layout) -> None:
        self.split, self.layout = split, layout
        self.n = layout.windows(split.n_tokens)

    def __len__(self) -> int:
        return self.n

    def get(self, i: int) -> np.ndarray:
        start = i * self.layout.stride
        return self.split.tokens(start, start + self.layout.read_len)

    def length(self, i: int) -> int:
        return self.layout.read_len

    def prefetch(self, i: int) -> None:
        start = i * self.layout.stride
        self.split.prefetch(start, start + self.layout.read_len)


class Task(abc.ABC):
    """One training objective, bound to a run's ``data`` settings and the model's special ids.

    Subclasses set ``name`` (the value of the run config's ``task`` key) and implement the
    abstract methods; ``layout`` is computed once, when the task is built.
    """

    name: ClassVar[str]
    # ``zeroforge sample`` prints the prompt before the output when the output continues it.
    echo_prompt: ClassVar[bool] = True
    # Store formats (data_prep examples.FORMATS) the task reads.
    store_formats: ClassVar[tuple[str, ...]] = ("text", "sft", "pairs")
    # Sort every global batch by unit length, so each micro-batch pads little (seq2seq).
    length_aware: ClassVar[bool] = False
    unit_name: ClassVar[str] = "window"  # for messages: what one unit is

    def __init__(self, data: DataConfig, special: SpecialIds,
                 examples: dict[str, Any] | None = None) -> None:
        """``examples``: the stores' ``examples`` attribute (format, template), None for text."""
        self.data, self.special, self.examples = data, special, examples
        self.layout = self.make_layout()

    @abc.abstractmethod
    def make_layout(self) -> Layout:
        """The window geometry; raises ConfigError naming the ``data.*`` key that does not fit."""

    def units(self, split: SplitReader, seed: int, store: int) -> Units:
        """The units of ``split`` (store ``store`` of the run); fixed windows by default.
        ``seed`` decides anything random about them (the shuffle before packing)."""
        return WindowUnits(split, self.layout)

    @abc.abstractmethod
    def batch(self, windows: Sequence[Any], sample_ids: Sequence[int], seed: int,
              stream: int) -> dict[str, torch.Tensor]:
        """One batch of CPU tensors from units (``Units.get``); always includes ``sample_ids``.
        Randomness (span masks) comes from ``(seed, stream, sample id)`` alone."""

    @abc.abstractmethod
    def logits_and_labels(self, model: Any, batch: dict[str, torch.Tensor], device: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, T, V), labels (B, T))`` of a batch, for evaluation."""

    @abc.abstractmethod
    def prompt_ids(self, text: str, enc: tiktoken.Encoding) -> list[int]:
        """Model input for a text prompt (``zeroforge sample``, samples during training)."""

    def held_out(self, example: tuple[np.ndarray, np.ndarray]) -> tuple[list[int], list[int]]:
        """(prompt ids, reference ids) of a fine-tuning example, for ``zeroforge eval
        --generate``: the prompt is everything before the example's last loss-bearing run (its
        last response, or the target), the reference is that run without the final EOT."""
        tokens, mask = example
        rises = np.nonzero(np.diff(np.concatenate(([0], mask.astype(np.int64)))) == 1)[0]
        start = int(rises[-1])
        return tokens[:start].astype(np.int64).tolist(), tokens[start:-1].astype(np.int64).tolist()

    def order_identity(self) -> dict[str, Any]:
        """Settings besides the stores and seed that change which tokens a sample holds; a
        resume refuses to continue if they changed."""
        return {}

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens of the batch that carry loss, counted on the CPU tensors (no device sync)."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor], device: str
                 ) -> tuple[torch.Tensor, int]:
        """(summed token cross-entropy, a float32 scalar on ``device``; number of loss tokens)
        of a batch: the training loss and the evaluation loss. A batch without loss tokens
        sums to 0, not NaN."""
        logits, labels = self.logits_and_labels(model, batch, device)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, self.loss_tokens(batch)
