"""Model families and training tasks: the one place that knows which is which.

A family names its config class, model class, the tasks it trains (the first is its default),
how it generates, how it converts to and from Hugging Face, its FLOPs per example, its special
ids, how it answers lm-evaluation-harness requests and its context length. A task
(pipeline/tasks/) names the units it reads, its batches, its loss and its prompt format. Setup,
data, evaluation, sampling, export and weight loading ask this module and never branch on the
family themselves: adding a family or a task means a new entry here and the new code, nothing
else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from zeroforge.model import (
    GPT2,
    EncDecConfig,
    EncoderDecoder,
    GPT2Config,
    encdec_flops_per_token,
    generate_encdec,
    generate_gpt2,
    gpt2_flops_per_token,
    load_encdec_hf,
    load_gpt2_hf,
    save_encdec_hf,
    save_gpt2_hf,
    score_encdec,
    score_gpt2,
    sentinel_ids,
)
from zeroforge.pipeline.data.config import DataConfig
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.tasks.base import Layout, SpecialIds, Task
from zeroforge.pipeline.tasks.next_token import NextToken
from zeroforge.pipeline.tasks.seq2seq import SequenceToSequence
from zeroforge.pipeline.tasks.sft import SupervisedFineTuning
from zeroforge.pipeline.tasks.span_corruption import SpanCorruption

ModelConfig = GPT2Config | EncDecConfig


@dataclass(frozen=True)
class LMForm:
    """How a family answers lm-evaluation-harness requests (pipeline/results/harness.py)."""

    # The harness's own name for the form, which decides how it tokenizes a (context,
    # continuation) pair: "causal" (one sequence, tokenized whole) or "seq2seq" (apart).
    backend: str
    score: Callable[..., list[tuple[float, bool]]]  # (model, [(ctx, cont)], max_length)
    max_length: Callable[[Any], int]  # tokens one request may use (its model config -> int)
    generation_shares_window: bool  # True: the context and the generated tokens share it


# T5's relative positions set no hard limit; 1024 is the model_max_length of the GPT-2
# tokenizer an export carries, which the harness's Hugging Face backend reads as its limit.
ENCDEC_HARNESS_MAX_LENGTH = 1024


@dataclass(frozen=True)
class Family:
    name: str  # the run config's model.family
    config_cls: type[Any]
    model_cls: type[torch.nn.Module]
    tasks: tuple[str, ...]  # the tasks it trains; the first is the default
    hf_model_type: str  # config.json "model_type" of its Hugging Face export
    generate: Callable[..., list[list[int]]]  # (model, prompts, max_new_tokens, Sampling)
    save_hf: Callable[[Any, str | Path], None]
    load_hf: Callable[..., Any]  # (path, **config overrides) -> model
    # Training FLOPs of one example of the given layout (model/flops.py conventions).
    flops_per_example: Callable[[Any, Layout], float]
    special_ids: Callable[[Any], SpecialIds]
    lm: LMForm  # downstream evaluation (lm-evaluation-harness)
    # The config field bounding the input length, prompt + generation included (learnt
    # position embeddings); None: no bound (the encoder-decoder's relative positions).
    context_field: str | None = None

    def build(self, config: ModelConfig) -> torch.nn.Module:
        return self.model_cls(config)

    def context_length(self, config: ModelConfig) -> int | None:
        """Longest input the model takes (decoder-only context), None: no such limit."""
        return getattr(config, self.context_field) if self.context_field else None


def _gpt2_flops(cfg: GPT2Config, layout: Layout) -> float:
    return gpt2_flops_per_token(cfg, layout.input_len) * layout.input_len


def _encdec_flops(cfg: EncDecConfig, layout: Layout) -> float:
    # Per target token, as model/flops.py derives it; the encoder's work rides along.
    return encdec_flops_per_token(cfg, layout.input_len, layout.target_len) * layout.target_len


def _gpt2_special(cfg: GPT2Config) -> SpecialIds:
    return SpecialIds(eos=cfg.eos_token_id, sentinels=tuple(sentinel_ids(cfg)))


def _gpt2_context(cfg: GPT2Config) -> int:
    return cfg.n_positions


def _encdec_special(cfg: EncDecConfig) -> SpecialIds:
    return SpecialIds(eos=cfg.eos_token_id, pad=cfg.pad_token_id,
                      decoder_start=cfg.decoder_start_token_id, sentinels=tuple(sentinel_ids(cfg)))


FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", GPT2Config, GPT2, ("gpt", "sft"), "gpt2", generate_gpt2,
                   save_gpt2_hf, load_gpt2_hf, _gpt2_flops, _gpt2_special,
                   LMForm("causal", score_gpt2, _gpt2_context, True),
                   context_field="n_positions"),
    "encdec": Family("encdec", EncDecConfig, EncoderDecoder, ("t5", "seq2seq"), "t5",
                     generate_encdec, save_encdec_hf, load_encdec_hf, _encdec_flops,
                     _encdec_special,
                     LMForm("seq2seq", score_encdec, lambda c: ENCDEC_HARNESS_MAX_LENGTH, False)),
}

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    NextToken, SpanCorruption, SupervisedFineTuning, SequenceToSequence)}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"model.family: must be one of {sorted(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def family_of(config: ModelConfig) -> Family:
    """The family whose config class ``config`` is."""
    for fam in FAMILIES.values():
        if type(config) is fam.config_cls:
            return fam
    raise TypeError(f"no model family has config class {type(config).__name__}")


def family_with_fields(names: Iterable[str]) -> Family | None:
    """The family whose config class has exactly the fields ``names`` (for checkpoints that
    predate recording their family)."""
    names = set(names)
    for fam in FAMILIES.values():
        if {f.name for f in dataclasses.fields(fam.config_cls)} == names:
            return fam
    return None


def model_changes(saved_family: str | None, saved: dict[str, Any], config: ModelConfig
                  ) -> list[str]:
    """What differs between a saved model and ``config`` in a way that changes the weights:
    the family, else every field but the config class's ``WEIGHT_NEUTRAL`` ones, each as
    ``model.<field>: old -> new``."""
    family = family_of(config)
    if saved_family is None:
        found = family_with_fields(saved)
        saved_family = found.name if found is not None else None
    if saved_family != family.name:
        return [f"model.family: {saved_family!r} -> {family.name!r}"]
    current = config.to_dict()
    return [f"model.{k}: {saved.get(k)!r} -> {current.get(k)!r}"
            for k in sorted(set(saved) | set(current))
            if k not in type(config).WEIGHT_NEUTRAL and saved.get(k) != current.get(k)]


def input_problems(config: ModelConfig, layout: Layout) -> list[str]:
    """Task inputs longer than the model can take (``data.seq_len`` against the context)."""
    family = family_of(config)
    field, limit = family.context_field, family.context_length(config)
    if limit is not None and layout.input_len > limit:
        return [f"data.seq_len: inputs of {layout.input_len} tokens are longer than the model's "
                f"context, model.{field}={limit}; lower data.seq_len or raise model.{field}"]
    return []


def family_of_hf(model_type: str | None, where: str) -> Family:
    """The family that reads a Hugging Face directory of ``model_type``."""
    for fam in FAMILIES.values():
        if fam.hf_model_type == model_type:
            return fam
    raise ConfigError(f"{where}: Hugging Face model_type {model_type!r} is not one of "
                      f"{sorted(f.hf_model_type for f in FAMILIES.values())}")


def task_name(family_name: str, requested: str | None) -> str:
    """The task a run of ``family_name`` trains: ``requested`` (the run config's ``task``) if the
    family trains it, else the family's default; raises ConfigError naming ``task``."""
    fam = family(family_name)
    if requested is None:
        return fam.tasks[0]
    if requested not in TASKS:
        raise ConfigError(f"task: must be one of {sorted(TASKS)}, got {requested!r}")
    if requested not in fam.tasks:
        raise ConfigError(f"task: model.family {fam.name} trains {', '.join(fam.tasks)}, "
                          f"not {requested}")
    return requested


def make_task(name: str, data: DataConfig, model_config: ModelConfig,
              examples: dict[str, Any] | None = None) -> Task:
    """Task ``name`` bound to ``data``, the special ids of ``model_config``'s family and the
    stores' ``examples`` description (fine-tuning stores; None for text)."""
    return TASKS[name](data, family_of(model_config).special_ids(model_config), examples)
