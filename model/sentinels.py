"""The single definition of sentinel token ids (span-corruption masks for T5-style training).

Scheme: sentinel ``k`` (k = 0 .. n_sentinels-1) has id ``vocab_size + k``, i.e. sentinels are
appended *after* the tokenizer vocabulary in increasing order. Original T5 instead counts down
from the top of its SentencePiece vocabulary (``<extra_id_0>`` = 32099); we count up so the
tokenizer ids stay untouched and the scheme does not depend on any vocabulary padding.
HF export keeps the same ids (the exported vocabulary is ``vocab_size + n_sentinels`` rows) and
records the scheme in ``zeroforge_config.json`` next to ``config.json``.

No torch import: the data pipeline imports this module.
"""

from __future__ import annotations

from typing import Protocol


class _HasSentinels(Protocol):
    vocab_size: int
    n_sentinels: int


def sentinel_id(config: _HasSentinels, k: int) -> int:
    """Token id of sentinel ``k`` (``<extra_id_k>`` in T5 terms)."""
    if not 0 <= k < config.n_sentinels:
        raise ValueError(f"sentinel index {k} out of range for n_sentinels={config.n_sentinels}")
    return config.vocab_size + k


def sentinel_ids(config: _HasSentinels) -> list[int]:
    """All sentinel ids, sentinel 0 first."""
    return [config.vocab_size + k for k in range(config.n_sentinels)]


def is_sentinel(config: _HasSentinels, token_id: int) -> bool:
    return config.vocab_size <= token_id < config.vocab_size + config.n_sentinels
