"""Small lm-evaluation-harness tasks built from this Python's pydoc topic texts (builtin data, no
download): a 4-way multiple-choice task, a generation task and a perplexity (rolling
log-likelihood) task, each a YAML file over a local JSONL file in one folder (the folder is the
harness's include path).

    folder = write_tasks(tmp_path)   # tasks "pydoc_mc", "pydoc_gen", "pydoc_ppl"

``GEN_HF_SEQ2SEQ`` is the generation task as the harness's Hugging Face backend needs it to
generate ``GEN``'s ``GEN_MAX_TOKENS`` tokens from an encoder-decoder, the reference our
encoder-decoder is compared with (tests/e2e/test_harness.py): that backend's seq2seq path hands
``generate()`` ``max_length`` = the batch's longest context + ``max_gen_toks``, which for an
encoder-decoder counts decoder tokens from the start token, so it would generate up to
(context length + ``max_gen_toks`` - 1) tokens. A ``max_length`` in the task's generation
settings replaces that sum; this twin sets it to the start token + ``GEN_MAX_TOKENS``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from pydoc_data.topics import topics

MC, GEN, PPL = "pydoc_mc", "pydoc_gen", "pydoc_ppl"
GEN_HF_SEQ2SEQ = "pydoc_gen_hf_seq2seq"
GEN_MAX_TOKENS = 12
N_DOCS = 24


def hf_backend_task(task: str, backend: str) -> str:
    """The task the harness's Hugging Face backend runs to match ours on ``task``, for a model
    of the harness form ``backend`` (``causal``, ``seq2seq``)."""
    return GEN_HF_SEQ2SEQ if task == GEN and backend == "seq2seq" else task


def _prose_lines() -> list[list[str]]:
    """Word lists of prose lines (no markup, no code), one per topic, in topic order."""
    out = []
    for name in sorted(topics):
        for line in topics[name].splitlines():
            words = line.split()
            if len(words) >= 10 and re.fullmatch(r"[A-Za-z ,.'()]+", line.strip()):
                out.append(words)
                break
    return out


def _write(folder: Path, name: str, rows: list[dict], spec: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        f"test_split: test\n{spec}")


def write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = _prose_lines()[:N_DOCS]
    assert len(lines) >= 12, "pydoc topics changed: too few prose lines"
    mc, gen = [], []
    for i, words in enumerate(lines):
        context, answer = " ".join(words[:7]), " ".join(words[7:10])
        # Distractors: the same positions of other topics' lines; the gold answer rotates.
        others = [" ".join(lines[(i + k) % len(lines)][7:10]) for k in (1, 2, 3)]
        label = i % 4
        choices = others[:label] + [answer] + others[label:]
        mc.append({"context": context, "choices": choices, "label": label})
        gen.append({"context": " ".join(words[:8]), "target": " " + " ".join(words[8:10])})
    _write(folder, MC, mc, (
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"))
    def generation(extra: str = "") -> str:
        return ("output_type: generate_until\n"
                "doc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\ntarget_delimiter: ''\n"
                "generation_kwargs:\n  until: [\"\\n\\n\", \" def\"]\n"
                f"  max_gen_toks: {GEN_MAX_TOKENS}\n  do_sample: false\n" + extra +
                "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
                "    higher_is_better: true\n")

    _write(folder, GEN, gen, generation())
    _write(folder, GEN_HF_SEQ2SEQ, gen, generation(f"  max_length: {GEN_MAX_TOKENS + 1}\n"))
    # Long enough that a 256-position model needs several rolling windows per document.
    ppl = [{"text": topics[name][:1600]} for name in sorted(topics)[:6]]
    _write(folder, PPL, ppl, (
        "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"))
    return folder
