"""Fine-tuning in this process (world size 1 over gloo, a real DeepSpeed engine, real stores):

- mask correctness: ``zeroforge eval``'s loss of a fine-tuned checkpoint equals a masked
  cross-entropy computed with transformers on the HF export of that checkpoint, over the
  held-out examples tokenized here independently (tiktoken, the documented template strings,
  the documented split rule), for sft and seq2seq;
- loss normalisation: a micro-batch without loss tokens neither makes the step NaN nor biases
  its mean (the gradient is that of the other micro-batch's mean loss);
- a learning check: random prompts with one fixed response; the masked val loss falls close to
  zero, which it could not if the prompts carried loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
from zeroforge.data_prep.build import PrepOptions, build_store
from zeroforge.data_prep.examples import ExampleOptions
from zeroforge.data_prep.pydoc_qa import pydoc_qa
from zeroforge.data_prep.tokenize import get_encoding
from zeroforge.model import Sampling
from zeroforge.pipeline.config import load_run_config
from zeroforge.pipeline.dist import PreemptionFlag, discover
from zeroforge.pipeline.errors import EXIT_OK
from zeroforge.pipeline.registry import make_task
from zeroforge.pipeline.results.evaluate import evaluate_checkpoint
from zeroforge.pipeline.results.export import export
from zeroforge.pipeline.results.generations import generate_held_out
from zeroforge.pipeline.results.sample import sample
from zeroforge.pipeline.results.weights import read_checkpoint, resolve_checkpoint
from zeroforge.pipeline.tasks.base import IGNORE_INDEX
from zeroforge.pipeline.training.loop import fit
from zeroforge.pipeline.training.setup import setup
from zeroforge.pipeline.training.state import Outcome
from zeroforge.pipeline.training.step import train_step

EOT = 50256
VAL = 0.1


def _store(path, fmt, inputs=("builtin:pydoc-qa",), **kw):
    build_store(list(inputs), path, PrepOptions(val_fraction=VAL, progress=False,
                                                examples=ExampleOptions(format=fmt, **kw)))
    return path


def _train(recipe, store, run_dir, device, overrides=()):
    cfg = load_run_config(recipe, [
        f"data.store={store}", f"run_dir={run_dir}", "init_from=null", "train.max_steps=4",
        "train.eval_every=0", "train.sample_tokens=0", "checkpoint.every=4",
        "tracking.backend=none", "data.val_windows=64", *overrides])
    run = setup(cfg, discover(), device)
    try:
        assert fit(run, PreemptionFlag()) == EXIT_OK
    finally:
        run.loader.close()
        run.metrics.close()
        run.progress.close()
    return cfg


def _is_val(doc_id: str) -> bool:
    """The documented split rule (docs/token-store.md), written out here."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h < VAL * 2**64


def _held_out_pairs() -> list[tuple[str, str]]:
    return [(r["prompt"], r["response"]) for doc_id, r in pydoc_qa() if _is_val(doc_id)]


def _masked_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return float(loss), int((labels != IGNORE_INDEX).sum())


def test_sft_eval_loss_equals_masked_cross_entropy_of_the_hf_export(device, tmp_path):
    store = _store(tmp_path / "sft", "sft", template="chat")
    cfg = _train("gpt2-sft-tiny-cpu", store, tmp_path / "run", device)
    tag = resolve_checkpoint(tmp_path / "run")
    ours = evaluate_checkpoint(cfg, tag)
    export(tag, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    enc = get_encoding("gpt2")
    total, count = 0.0, 0
    for prompt, response in _held_out_pairs():
        # The chat template as docs/token-store.md spells it: each piece tokenized on its own.
        head = enc.encode_ordinary("User: ") + enc.encode_ordinary(prompt) + \
            enc.encode_ordinary("\n") + enc.encode_ordinary("Assistant: ")
        answer = enc.encode_ordinary(response) + enc.encode_ordinary("\n") + [EOT]
        ids = torch.tensor([head + answer])
        labels = torch.tensor([[IGNORE_INDEX] * len(head) + answer])
        with torch.no_grad():
            logits = hf(ids).logits[:, :-1]  # position t predicts token t + 1
        s, n = _masked_ce_sum(logits, labels[:, 1:])
        total, count = total + s, count + n
    assert ours["val/tokens"] == count, "every held-out response token, and only those"
    assert ours["val/loss"] == pytest.approx(total / count, rel=1e-5)


def test_seq2seq_eval_loss_equals_masked_cross_entropy_of_the_hf_export(device, tmp_path):
    store = _store(tmp_path / "pairs", "pairs")
    cfg = _train("t5-seq2seq-tiny-cpu", store, tmp_path / "run", device,
                 ["data.seq_len=64", "data.target_len=192"])
    tag = resolve_checkpoint(tmp_path / "run")
    ours = evaluate_checkpoint(cfg, tag)
    export(tag, tmp_path / "hf")
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    enc = get_encoding("gpt2")
    total, count = 0.0, 0
    for source, target in _held_out_pairs():
        src, tgt = enc.encode_ordinary(source), enc.encode_ordinary(target) + [EOT]
        if len(src) > 64 or len(tgt) > 192:
            continue  # left out of the run too (data.seq_len / data.target_len)
        labels = torch.tensor([tgt])
        with torch.no_grad():  # HF shifts the labels right behind decoder_start_token_id
            logits = hf(input_ids=torch.tensor([src]), labels=labels).logits
        s, n = _masked_ce_sum(logits, labels)
        total, count = total + s, count + n
    assert ours["val/tokens"] == count
    assert ours["val/loss"] == pytest.approx(total / count, rel=1e-5)


def test_a_micro_batch_without_loss_tokens_neither_nans_nor_biases_the_step(device, tmp_path):
    store = _store(tmp_path / "sft", "sft")
    cfg = load_run_config("gpt2-sft-tiny-cpu", [
        f"data.store={store}", f"run_dir={tmp_path / 'run'}", "init_from=null",
        "train.micro_batch_size=2", "train.grad_accum=2", "tracking.backend=none",
        "optim.grad_clip=0", "data.seq_len=128"])
    run = setup(cfg, discover(), device)
    try:
        real = next(iter(run.loader))
        masked = {**real, "labels": torch.full_like(real["labels"], IGNORE_INDEX)}
        reference = run.family.build(run.model_config)
        reference.load_state_dict(run.engine.module.state_dict())
        task = make_task("sft", cfg.data, run.model_config, run.task.examples)
        s, n = task.loss_sum(reference, real, "cpu")
        (s / n).backward()
        want_norm = math.sqrt(sum(float(p.grad.double().pow(2).sum())
                                  for p in reference.parameters() if p.grad is not None))

        result = train_step(run, iter([masked, real]), PreemptionFlag())
        assert result.outcome is Outcome.APPLIED and math.isfinite(result.loss)
        assert result.loss == pytest.approx(float(s.detach() / n), rel=1e-6)
        assert float(run.engine.get_global_grad_norm()) == pytest.approx(want_norm, rel=1e-5)
        # A step with no loss token anywhere: loss 0 and a zero gradient, not NaN.
        result = train_step(run, iter([masked, masked]), PreemptionFlag())
        assert result.loss == 0.0 and result.outcome is Outcome.APPLIED
        assert all(torch.isfinite(p).all() for p in run.engine.module.parameters())
    finally:
        run.loader.close()
        run.metrics.close()
        run.progress.close()


def test_learning_check_random_prompts_fixed_response(device, tmp_path):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    rows = [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(4, 20))),
             "response": "The answer is forty-two."} for _ in range(600)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = _store(tmp_path / "s", "sft", inputs=[str(tmp_path / "d.jsonl")])
    cfg = _train("gpt2-sft-tiny-cpu", store, tmp_path / "run", device, [
        "train.max_steps=100", "checkpoint.every=100", "data.seq_len=64", "optim.lr=3e-3",
        "optim.warmup_steps=5", "train.micro_batch_size=8", "data.val_windows=16"])
    tag = resolve_checkpoint(tmp_path / "run")
    masked = evaluate_checkpoint(cfg, tag)["val/loss"]
    # The same model and store, the loss over every token (task gpt): the random prompts
    # cannot be predicted, so a model trained on them as well could not get near zero.
    every = evaluate_checkpoint(cfg.model_copy(update={"task": "gpt"}), tag)["val/loss"]
    assert masked < 0.1, masked
    assert every > 2.0, every
    # Held-out generations (zeroforge eval --generate) reproduce the response exactly.
    scores = generate_held_out(cfg, tag, 4, tmp_path / "gen.jsonl", max_new_tokens=16)
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert scores["generate/examples"] == len(rows) == 4
    assert scores["generate/exact_match"] == 1.0 and scores["generate/f1"] == 1.0
    assert {r["reference"] for r in rows} == {"The answer is forty-two."}
    # zeroforge sample renders a new prompt through the template saved with the checkpoint
    # (the store is gone), and the model answers it as it learnt to.
    shutil.rmtree(store)
    out = sample(tag, "w1 w2 w3 w400", 16, 1, Sampling())
    assert out.task.template is not None and out.task.template.name == "plain"
    enc = get_encoding("gpt2")
    assert out.task.prompt_ids("w1 w2 w3 w400", enc) == enc.encode_ordinary("w1 w2 w3 w400") + \
        enc.encode_ordinary("\n")
    assert out.texts == ["The answer is forty-two.\n"]


def test_fine_tuning_starts_from_a_run_or_a_hugging_face_export(device, tmp_path):
    """init_from a pretraining run of the same model (task gpt on a text store), or its HF
    export: the sft run starts from exactly those weights."""
    text = tmp_path / "text"
    build_store(["builtin:pydoc-topics"], text, PrepOptions(val_fraction=0.1, progress=False))
    _train("gpt2-tiny-cpu", text, tmp_path / "pre", device, ["data.seq_len=32"])
    pretrained = read_checkpoint(tmp_path / "pre")
    export(tmp_path / "pre", tmp_path / "hf")
    sft = _store(tmp_path / "sft", "sft")
    for source in (tmp_path / "pre", tmp_path / "hf"):
        cfg = load_run_config("gpt2-sft-tiny-cpu", [
            f"data.store={sft}", f"run_dir={tmp_path / source.name}-sft", f"init_from={source}",
            "tracking.backend=none"])
        run = setup(cfg, discover(), device)
        try:
            assert run.task.name == "sft"
            state = run.engine.module.state_dict()
            for name, value in pretrained[1].items():
                assert torch.equal(state[name], value), (source.name, name)
        finally:
            run.loader.close()
            run.metrics.close()
            run.progress.close()
