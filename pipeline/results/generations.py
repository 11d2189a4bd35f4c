"""Generations for held-out fine-tuning examples, scored (``zeroforge eval --generate N``).

N examples of the stores' ``val`` split, evenly spread over it, are split the way the task
reads them (``Task.held_out``: the prompt, or the source, then the reference, which is the last
response or the target). The checkpoint decodes greedily from each prompt until EOT or
``max_new_tokens``; the generation and the reference are compared as text after lowercasing and
collapsing whitespace:

- exact match: 1 when the two are equal;
- token F1: the harmonic mean of precision and recall of the generation's whitespace-separated
  words against the reference's (counted with multiplicity, as in SQuAD).

Every generation goes to a JSONL file (one object per example, written atomically).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

from zeroforge.data_prep import atomic
from zeroforge.data_prep.tokenize import get_encoding
from zeroforge.model import Sampling
from zeroforge.pipeline import registry
from zeroforge.pipeline.config import RunConfig
from zeroforge.pipeline.data.examples import ExampleSpans
from zeroforge.pipeline.data.windows import open_stores, store_examples
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.results.sample import decode
from zeroforge.pipeline.results.weights import load_model

BATCH = 8  # prompts generated together


def normalize(text: str) -> list[str]:
    return text.lower().split()


def token_f1(generated: str, reference: str) -> float:
    gen, ref = normalize(generated), normalize(reference)
    if not gen or not ref:
        return float(gen == ref)
    common = sum((collections.Counter(gen) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(gen), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(generated: str, reference: str) -> float:
    return float(normalize(generated) == normalize(reference))


def generate_held_out(cfg: RunConfig, tag_dir: Path, n: int, out: Path,
                      max_new_tokens: int = 128, device: str = "cpu") -> dict[str, Any]:
    """Generate for ``n`` held-out examples, write them to ``out``; the mean scores."""
    if n < 1:
        raise ConfigError(f"--generate must be at least 1, got {n}")
    stores = open_stores(cfg.data)
    if store_examples(stores) is None:
        raise ConfigError(f"--generate: {cfg.data.source_key(0)} is a text store; generation "
                          "is scored on fine-tuning stores (zeroforge prep --format sft|pairs)")
    model, info = load_model(tag_dir, device)
    task = registry.make_task(cfg.task_name, cfg.data, info.model_config, store_examples(stores))
    spans = [ExampleSpans(s.split("val")) for s in stores]
    every = [(j, i) for j, sp in enumerate(spans) for i in range(len(sp))]
    if not every:
        raise ConfigError(f"--generate: the stores have no val examples ({cfg.data.source_key(0)}"
                          "; rebuild with --val-fraction > 0)")
    chosen = [every[k * len(every) // min(n, len(every))] for k in range(min(n, len(every)))]
    enc = get_encoding(stores[0].tokenizer)
    limit = info.family.context_length(info.model_config)
    rows = []
    for a in range(0, len(chosen), BATCH):
        held = [task.held_out(spans[j].read(i)) for j, i in chosen[a:a + BATCH]]
        prompts = [p for p, _ in held]
        new = max_new_tokens if limit is None else min(
            max_new_tokens, limit - max(len(p) for p in prompts))
        if new < 1:
            raise ConfigError(f"--generate: a held-out prompt fills the model's context ({limit})")
        outputs = info.family.generate(model, prompts, new, Sampling())
        for (j, i), (prompt, ref), ids in zip(chosen[a:a + BATCH], held, outputs, strict=True):
            generated = decode(ids, enc, info.model_config).strip()
            reference = decode(ref, enc, info.model_config).strip()
            rows.append({"store": j, "example": i, "prompt": decode(prompt, enc, info.model_config),
                         "reference": reference, "generation": generated,
                         "exact_match": exact_match(generated, reference),
                         "f1": token_f1(generated, reference)})
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return {"generate/examples": len(rows),
            "generate/exact_match": sum(r["exact_match"] for r in rows) / len(rows),
            "generate/f1": sum(r["f1"] for r in rows) / len(rows),
            "generations": str(out)}
