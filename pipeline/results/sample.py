"""Text from a checkpoint, in one process (``zeroforge sample``).

The prompt becomes model input the way the checkpoint's task reads it (pipeline/tasks/): a
GPT-2 model continues the text; an encoder-decoder trained with span corruption reads it as
encoder input, ``<extra_id_K>`` standing for sentinel K. Sentinels in the output are printed back
as ``<extra_id_K>``, other ids the tokenizer lacks as ``<unused_id_N>``. The weights are loaded directly (results/weights.py): no launcher, no
DeepSpeed engine; the tokenizer is the one the checkpoint was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tiktoken
from zeroforge.data_prep.tokenize import get_encoding
from zeroforge.model import Sampling, is_sentinel
from zeroforge.pipeline import registry
from zeroforge.pipeline.data.config import DataConfig
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.registry import ModelConfig
from zeroforge.pipeline.results.weights import CheckpointInfo, load_model
from zeroforge.pipeline.tasks.base import Task


@dataclass
class Samples:
    info: CheckpointInfo
    tokenizer: str
    task: Task
    outputs: list[list[int]]  # generated ids per sample
    texts: list[str]  # their text


def decode(ids: list[int], enc: tiktoken.Encoding, model_config: ModelConfig) -> str:
    """Text of generated ids: stops at EOS; sentinels as ``<extra_id_K>``; ids the tokenizer
    does not define and that are no sentinel (a model vocabulary larger than the tokenizer's,
    or its padding rows) as ``<unused_id_N>``."""
    eos = model_config.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    parts: list[str] = []
    run: list[int] = []
    for t in ids:
        if t < enc.n_vocab:
            run.append(t)
            continue
        parts.append(enc.decode(run))
        run = []
        if is_sentinel(model_config, t):
            parts.append(f"<extra_id_{t - model_config.vocab_size}>")
        else:
            parts.append(f"<unused_id_{t}>")
    parts.append(enc.decode(run))
    return "".join(parts)


def checkpoint_task(info: CheckpointInfo) -> Task:
    """The task the checkpoint was trained with, bound to its saved data settings and to the
    examples description (template) of its token store, saved with the checkpoint."""
    saved = info.run_config
    name = registry.task_name(info.family.name, saved.get("task"))
    return registry.make_task(name, DataConfig.model_validate(saved.get("data") or {}),
                              info.model_config, info.data_order.get("examples"))


def sample(checkpoint: str | Path, prompt: str, max_new_tokens: int, num_samples: int,
           sampling: Sampling, tokenizer: str | None = None, device: str = "cpu") -> Samples:
    """``num_samples`` outputs of the checkpoint for ``prompt``."""
    model, info = load_model(checkpoint, device)
    tokenizer = tokenizer or info.tokenizer
    if tokenizer is None:
        raise ConfigError(f"{info.tag_dir}: the checkpoint does not record its tokenizer and its "
                          "token store is gone; pass --tokenizer NAME")
    enc = get_encoding(tokenizer)
    task = checkpoint_task(info)
    ids = task.prompt_ids(prompt, enc)
    outputs = info.family.generate(model, [ids] * num_samples, max_new_tokens, sampling)
    texts = [decode(out, enc, info.model_config) for out in outputs]
    return Samples(info, tokenizer, task, outputs, texts)
