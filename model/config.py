"""Model configurations for zeroforge (plain dataclasses, no torch import).

Keeping this module free of torch lets the data pipeline and launch scripts read
configs (e.g. the vocabulary size and sentinel ids) without paying for a torch import.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

_C = TypeVar("_C", bound="_ConfigBase")


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


class _ConfigBase:
    """Shared helpers: dict round-trip, presets and collected validation."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    # Fields that change how the model trains but not its weights: a resume (and init_from)
    # may set them differently from the checkpoint, e.g. activation checkpointing on fewer GPUs.
    WEIGHT_NEUTRAL: ClassVar[frozenset[str]] = frozenset(
        {"dropout", "activation_checkpointing", "init_std"})

    def _problems(self) -> list[str]:  # overridden by subclasses
        return []

    def validate(self) -> None:
        """Raise one ValueError listing every invalid field (not just the first one)."""
        problems = self._problems()
        if problems:
            name = type(self).__name__
            raise ValueError(f"invalid {name}: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls: type[_C], name: str, **overrides: Any) -> _C:
        """Build a named preset; keyword overrides replace individual fields."""
        if name not in cls.PRESETS:
            raise ValueError(
                f"unknown {cls.__name__} preset {name!r}; choose one of {sorted(cls.PRESETS)}"
            )
        return cls.from_dict({**cls.PRESETS[name], **overrides})

    @property
    def total_vocab_size(self) -> int:
        """Rows of the embedding that carry meaning: tokenizer vocab plus sentinel tokens."""
        return self.vocab_size + self.n_sentinels  # type: ignore[attr-defined]

    @property
    def padded_vocab_size(self) -> int:
        """Embedding/LM-head rows actually allocated (padding is only for matmul speed)."""
        return _round_up(self.total_vocab_size, self.pad_vocab_to_multiple)  # type: ignore[attr-defined]


@dataclass
class GPT2Config(_ConfigBase):
    """GPT-2 (decoder-only) hyper-parameters. Field names follow GPT-2 / nanoGPT."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int = 50257  # tokenizer vocabulary (GPT-2 BPE)
    n_positions: int = 1024
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm (GPT-2 has them)
    pad_vocab_to_multiple: int = 1  # e.g. 128: faster LM-head matmul, logits are sliced back
    activation_checkpointing: bool = False
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    n_sentinels: int = 0  # decoder-only models normally need no sentinels
    eos_token_id: int | None = 50256  # <|endoftext|>

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
        "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
        "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
        "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
        # CPU-sized presets for tests and smoke runs.
        "gpt2-tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256),
        "gpt2-mini": dict(n_layer=4, n_head=4, n_embd=128, n_positions=512),
    }

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def _problems(self) -> list[str]:
        p: list[str] = []
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions",
                     "pad_vocab_to_multiple"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                p.append(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not p and self.n_embd % self.n_head != 0:
            p.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.n_sentinels < 0:
            p.append(f"n_sentinels must be >= 0, got {self.n_sentinels!r}")
        if self.layer_norm_eps <= 0:
            p.append(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if self.init_std <= 0:
            p.append(f"init_std must be > 0, got {self.init_std!r}")
        if self.eos_token_id is not None and isinstance(self.vocab_size, int) and not (
            0 <= self.eos_token_id < self.vocab_size + max(self.n_sentinels, 0)
        ):
            p.append(f"eos_token_id ({self.eos_token_id}) must be < vocab_size + n_sentinels")
        return p


@dataclass
class EncDecConfig(_ConfigBase):
    """T5 v1.1-style encoder-decoder hyper-parameters (names follow HF ``T5Config``)."""

    d_model: int
    d_ff: int
    num_layers: int  # encoder layers
    num_heads: int
    d_kv: int = 64  # per-head dim; T5 does not require num_heads * d_kv == d_model
    num_decoder_layers: int | None = None  # None -> same as num_layers
    vocab_size: int = 50257  # tokenizer vocabulary, sentinels are appended after it
    n_sentinels: int = 100
    pad_vocab_to_multiple: int = 1
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout: float = 0.0
    layer_norm_eps: float = 1e-6
    # False (T5 v1.1): separate LM head, no output scaling. True (T5 v1.0): the LM head
    # shares the embedding and decoder outputs are scaled by d_model**-0.5 (as HF does).
    tie_word_embeddings: bool = False
    pad_token_id: int = 50256
    eos_token_id: int | None = 50256
    decoder_start_token_id: int | None = None  # None -> pad_token_id (the T5 convention)
    activation_checkpointing: bool = False

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # T5 v1.1 shapes (google/t5-v1_1-*). Published sizes assume vocab 32128, i.e.
        # preset(name, vocab_size=32000, n_sentinels=100, pad_vocab_to_multiple=128).
        "t5-small": dict(d_model=512, d_ff=1024, num_layers=8, num_heads=6, d_kv=64),
        "t5-base": dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12, d_kv=64),
        "t5-large": dict(d_model=1024, d_ff=2816, num_layers=24, num_heads=16, d_kv=64),
        # CPU-sized preset for tests.
        "t5-tiny": dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16),
    }

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.pad_token_id
        self.validate()

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def _problems(self) -> list[str]:
        p: list[str] = []
        for name in ("d_model", "d_ff", "num_layers", "num_heads", "d_kv", "num_decoder_layers",
                     "vocab_size", "pad_vocab_to_multiple", "relative_attention_num_buckets",
                     "relative_attention_max_distance"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                p.append(f"{name} must be a positive int, got {v!r}")
        if self.n_sentinels < 0:
            p.append(f"n_sentinels must be >= 0, got {self.n_sentinels!r}")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.layer_norm_eps <= 0:
            p.append(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if p:
            return p
        total = self.vocab_size + self.n_sentinels
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < total:
                p.append(f"{name} ({v}) must be in [0, vocab_size + n_sentinels = {total})")
        return p
