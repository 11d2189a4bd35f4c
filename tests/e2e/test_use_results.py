"""Using what a run produced: `zeroforge eval --checkpoint`, `zeroforge sample`, `zeroforge
export` (logits equal to `transformers`' for a 2-rank ZeRO-3 GPT-2 and a 2-rank ZeRO-2 T5
checkpoint) and `init_from` (a new ZeRO-0 run starts from the ZeRO-3 run's weights with a fresh
optimizer).

Two training runs start together (module fixture) to share the launch cost on 2 cores; a third
run fine-tunes from the first one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from zeroforge.launch.cli import main

from tests.e2e.conftest import PYTHON, REPO, finish, launch, read_metrics, start, tiny_overrides

T5_CONFIG = str(REPO / "configs" / "t5-tiny-cpu.yaml")
GPT_STEPS = 10
T5_STEPS = 4


def _zeroforge(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "zeroforge.launch", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _run_module(command: str, argv: list[str]) -> int:
    """``zeroforge <command> <argv>`` in this process."""
    return main([command, *argv])


@pytest.fixture(scope="module")
def runs(tiny_store, tmp_path_factory):
    """A 2-rank ZeRO-3 GPT-2 run and a 2-rank ZeRO-2 T5 run, started together."""
    gpt_dir = tmp_path_factory.mktemp("use-gpt-zero3")
    gpt = start(gpt_dir, tiny_overrides(tiny_store, gpt_dir, **{
        "deepspeed.zero_optimization.stage": 3, "train.max_steps": GPT_STEPS,
        "checkpoint.every": 0}))
    t5_dir = tmp_path_factory.mktemp("use-t5-zero2")
    t5_log = t5_dir / "launch.log"
    with open(t5_log, "w") as f:
        t5 = subprocess.Popen(
            [PYTHON, "-m", "zeroforge.launch", "train", "--config", T5_CONFIG, "--nproc", "2",
             f"data.store={tiny_store}", f"run_dir={t5_dir}", "data.seq_len=32",
             "data.val_windows=4", "train.micro_batch_size=2", "train.grad_accum=1",
             f"train.max_steps={T5_STEPS}", "checkpoint.every=0", "train.eval_every=0",
             "deepspeed.zero_optimization.stage=2", "optim.lr=3e-3", "optim.warmup_steps=2"],
            cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    gpt_result = finish(*gpt, gpt_dir)
    t5_result = finish(t5, t5_log, t5_dir)
    assert gpt_result.returncode == 0, gpt_result.output[-4000:]
    assert t5_result.returncode == 0, t5_result.output[-4000:]
    return gpt_result, t5_result


def _logged_val(run_dir: Path) -> dict:
    return [r for r in read_metrics(run_dir) if "val/loss" in r][-1]


def test_export_zero3_gpt2_matches_transformers(runs, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from zeroforge.data_prep.tokenize import get_encoding
    from zeroforge.pipeline.results.weights import load_model

    gpt, _ = runs
    out = tmp_path / "hf"
    assert _run_module("export", ["--checkpoint", str(gpt.run_dir), "--out", str(out)]) == 0
    ours, info = load_model(gpt.run_dir)
    assert info.zero_stage == 3 and info.step == GPT_STEPS and info.tokenizer == "gpt2"
    theirs = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    source = json.loads((out / "zeroforge_source.json").read_text())
    assert source["step"] == GPT_STEPS and source["zero_stage"] == 3
    # The tokenizer travels with the export (offline GPT-2 BPE files).
    tok = AutoTokenizer.from_pretrained(out)
    text = "ROMEO: hello, world"
    assert tok(text)["input_ids"] == get_encoding("gpt2").encode_ordinary(text)
    # An export does not overwrite a non-empty directory by accident.
    assert _run_module("export", ["--checkpoint", str(gpt.run_dir), "--out", str(out)]) == 2


def test_export_t5_matches_transformers(runs, tmp_path):
    from transformers import T5ForConditionalGeneration
    from zeroforge.pipeline.results.weights import load_model

    _, t5 = runs
    out = tmp_path / "hf-t5"
    assert _run_module("export", ["--checkpoint", str(t5.run_dir / "checkpoints"),
                                "--out", str(out)]) == 0
    ours, info = load_model(t5.run_dir)
    assert info.family.name == "encdec" and info.zero_stage == 2 and info.step == T5_STEPS
    theirs = T5ForConditionalGeneration.from_pretrained(out).eval()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 50257, (2, 20), generator=g)
    dec = torch.randint(0, 50257, (2, 7), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=src, decoder_input_ids=dec).logits,
                                   ours(src, decoder_input_ids=dec), rtol=1e-4, atol=1e-4)


def test_eval_checkpoint_json_equals_training_eval(runs):
    gpt, _ = runs
    p = _zeroforge("eval", "--checkpoint", str(gpt.run_dir), "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout  # --json: stdout is exactly the JSON line
    out = json.loads(lines[0])
    logged = _logged_val(gpt.run_dir)
    assert out["step"] == GPT_STEPS and out["split"] == "val"
    # Consolidated ZeRO-3 weights in one process == the partitioned engine of the run.
    assert math.isclose(out["val/loss"], logged["val/loss"], rel_tol=1e-5)
    assert out["val/tokens"] == logged["val/tokens"]


def test_eval_train_split_and_errors(runs, capsys, tmp_path):

    gpt, t5 = runs
    tag = gpt.run_dir / "checkpoints" / f"step_{GPT_STEPS:08d}"
    assert _run_module("eval", ["--checkpoint", str(tag), "--split", "train", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["split"] == "train" and math.isfinite(out["train/loss"]) and out["train/tokens"]
    assert out["train/loss"] != _logged_val(gpt.run_dir)["val/loss"]
    # T5 checkpoints evaluate the same way (span-corruption val windows).
    assert _run_module("eval", ["--checkpoint", str(t5.run_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isclose(out["val/loss"], _logged_val(t5.run_dir)["val/loss"], rel_tol=1e-5)
    # A run dir without checkpoints: a one-line error, exit 1.
    assert _run_module("eval", ["--checkpoint", str(tmp_path)]) == 1
    assert "no committed checkpoint" in capsys.readouterr().err


def test_sample_gpt2_greedy(runs, capsys):
    from zeroforge.data_prep.tokenize import get_encoding

    gpt, _ = runs
    assert _run_module("sample", ["--checkpoint", str(gpt.run_dir / "checkpoints"), "--prompt",
                                "ROMEO:", "--max-new-tokens", "8", "--temperature", "0",
                                "--num-samples", "2", "--json"]) == 0
    a, b = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert a["tokens"] == b["tokens"] and 1 <= len(a["tokens"]) <= 8  # greedy: equal
    enc = get_encoding("gpt2")
    assert a["completion"] == enc.decode([t for t in a["tokens"] if t != enc.eot_token])


def test_sample_seeded_and_t5_sentinels(runs, capsys):

    gpt, t5 = runs
    base = ["--checkpoint", str(gpt.run_dir), "--prompt", "To be", "--max-new-tokens", "6",
            "--num-samples", "3", "--top-k", "50", "--top-p", "0.95", "--json"]
    outs = []
    for seed in ("7", "7", "8"):
        assert _run_module("sample", [*base, "--seed", seed]) == 0
        outs.append([json.loads(x)["tokens"] for x in capsys.readouterr().out.splitlines()])
    assert outs[0] == outs[1] and outs[0] != outs[2]
    assert _run_module("sample", ["--checkpoint", str(t5.run_dir), "--prompt",
                                "To be, or <extra_id_0> to be", "--max-new-tokens", "5",
                                "--temperature", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) <= 5
    assert _run_module("sample", ["--checkpoint", str(t5.run_dir), "--prompt", "<extra_id_999>"
                                ]) == 2  # a bad command-line value
    assert "100 sentinels" in capsys.readouterr().err


def test_init_from_starts_where_the_previous_run_ended(runs, tiny_store, tmp_path_factory):
    gpt, _ = runs
    before = [r for r in gpt.metrics() if "train/loss" in r]
    run_dir = tmp_path_factory.mktemp("use-init-from")
    result = launch(run_dir, tiny_overrides(tiny_store, run_dir, **{
        "init_from": str(gpt.run_dir), "deepspeed.zero_optimization.stage": 0,
        "train.max_steps": 3, "checkpoint.every": 0, "data.val_windows": 0}))
    assert result.returncode == 0, result.output[-4000:]
    assert "init_from: weights from" in result.output, result.output[-3000:]
    train = [r for r in result.metrics() if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]  # a new run: step counter from 0
    first, scratch, ended = train[0]["train/loss"], before[0]["train/loss"], before[-1]["train/loss"]
    # Step 1's loss is measured before any update: the loaded weights, not a fresh init. One
    # tiny batch is noisy, so: nearer the end of the previous run than its start, and far
    # below a fresh model's loss.
    assert abs(first - ended) < abs(first - scratch), (first, ended, scratch)
    assert first < scratch - 1.0, (first, scratch)
    # Its stage-0 checkpoint (the whole module in one file) loads the same way.
    from zeroforge.pipeline.results.weights import load_model

    model, info = load_model(run_dir)
    assert info.zero_stage == 0 and info.step == 3 and info.tokenizer == "gpt2"
    assert all(torch.isfinite(p).all() for p in model.parameters())
