"""lm-evaluation-harness's own Hugging Face backend (``lm_eval --model hf``) as the reference
our LM is compared with (tests/e2e/test_harness.py) and timed against
(benchmarks/harness_eval.py), on a Hugging Face export.

lm-eval 0.4.13 calls ``model.tie_weights()`` after loading; transformers >= 5 recomputes T5's
tying from a config whose ``tie_word_embeddings`` it always sets to True, so the separate head
of an untied T5 (T5 v1.1's, ours), which ``from_pretrained`` kept, becomes the input
embedding. ``hf_backend`` puts the checkpoint's head back (a no-op where the backend kept it):
the backend then scores the model ``T5ForConditionalGeneration.from_pretrained`` loads.
test_hf_backend_scores_an_untied_t5_head_with_the_input_embedding shows the fault.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lm_eval.models.huggingface import HFLM
from safetensors.torch import load_file


def checkpoint_head(export_dir: Path) -> torch.Tensor | None:
    """The export's own output head (None: the checkpoint ties it to the input embedding)."""
    return load_file(str(export_dir / "model.safetensors")).get("lm_head.weight")


def hf_backend(export_dir: Path, batch_size: int = 4, restore_head: bool = True) -> HFLM:
    """The backend over ``export_dir``, fp32 on CPU; ``restore_head``: see the module docstring."""
    lm = HFLM(pretrained=str(export_dir), dtype="float32", device="cpu", batch_size=batch_size)
    head = checkpoint_head(export_dir)
    if restore_head and head is not None and not torch.equal(lm.model.lm_head.weight, head):
        lm.model.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
    return lm
