"""The `zeroforge train` command line: config errors exit 2 naming the key, --print-config,
`--nproc 2` (ranks started directly; a T5 run, which also covers the encoder-decoder
path), and a relaunch with a changed model refused instead of silently starting over."""

from __future__ import annotations

import json
import subprocess

import pytest
from zeroforge.pipeline.errors import EXIT_CONFIG, EXIT_FAILED

from tests.e2e.conftest import PYTHON, REPO, read_metrics

T5_CONFIG = str(REPO / "configs" / "t5-tiny-cpu.yaml")


def _zeroforge(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "zeroforge.launch", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("override,expected", [
    ("train.max_stepz=3", "train.max_stepz: unknown key (did you mean train.max_steps?)"),
    ("train.seed=abc", "train.seed: expected an integer, got str 'abc'"),
    ("tracking.backend=wandb", "tracking.backend"),
    # Caught when the config loads, not inside the first forward.
    ("data.seq_len=512", "data.seq_len: inputs of 512 tokens are longer than the model's "
                         "context, model.n_positions=256"),
])
def test_config_errors_exit_2_naming_the_key(override, expected):
    p = _zeroforge("train", "--config", "gpt2-tiny-cpu", override)
    assert p.returncode == EXIT_CONFIG
    assert expected in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("launcher", ["zeroforge", "deepspeed"])
def test_bad_config_with_nproc_2_is_reported_once(launcher):
    # The ranks start while this process checks the config; a bad one stops them at once.
    p = _zeroforge("train", "--config", "gpt2-tiny-cpu", "--nproc", "2", "--launcher", launcher,
                   "train.seed=abc")
    assert p.returncode == EXIT_CONFIG, p.stderr[-3000:]
    assert p.stderr.count("train.seed: expected an integer, got str 'abc'") == 1, p.stderr
    assert "Traceback" not in p.stderr


def test_print_config_shows_run_and_merged_deepspeed_config():
    p = _zeroforge("train", "--config", "gpt2-tiny-cpu", "--print-config", "--nproc", "2",
                   "deepspeed.zero_optimization.stage=3", "train.grad_accum=3")
    assert p.returncode == 0, p.stderr
    run_part, ds_part = p.stdout.split("# DeepSpeed config (merged, world size 2)")
    assert "grad_accum: 3" in run_part
    ds = json.loads(ds_part)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2


@pytest.mark.parametrize("config,override,expected", [
    ("gpt2-tiny-cpu", "model.eos_token_id=5",
     "model.eos_token_id=5 is not the token store's end-of-text id 50256"),
    (T5_CONFIG, "model.pad_token_id=0",
     "model.pad_token_id=0 is not the token store's end-of-text id 50256"),
])
def test_special_ids_must_match_the_store(tiny_store, tmp_path, config, override, expected):
    p = _zeroforge("train", "--config", config, f"data.store={tiny_store}",
                   f"run_dir={tmp_path}", override)
    assert p.returncode == EXIT_CONFIG, p.stderr[-3000:]
    assert expected in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def t5_run(tiny_store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("t5")
    overrides = [f"data.store={tiny_store}", f"run_dir={run_dir}", "data.seq_len=32",
                 "data.val_windows=4", "train.micro_batch_size=2", "train.grad_accum=1",
                 "train.max_steps=6", "train.eval_every=3", "checkpoint.every=3",
                 "deepspeed.zero_optimization.stage=2", "optim.warmup_steps=2",
                 "optim.lr=3e-3"]
    p = _zeroforge("train", "--config", T5_CONFIG, "--nproc", "2", *overrides)
    return p, run_dir, overrides


def test_nproc_2_t5_run(t5_run):
    p, run_dir, _ = t5_run
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    records = read_metrics(run_dir)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    assert [r["step"] for r in records if "val/loss" in r] == [3, 6]
    merged = json.loads((run_dir / "ds_config.json").read_text())
    assert merged["train_batch_size"] == 4  # 2 ranks


def test_changed_model_is_refused_not_restarted(t5_run):
    p, run_dir, overrides = t5_run
    again = _zeroforge("train", "--config", T5_CONFIG, *overrides, "train.max_steps=8",
                       "model.num_layers=3")
    assert again.returncode == EXIT_FAILED
    assert "cannot resume" in again.stderr and "model.num_layers: 2 -> 3" in again.stderr
    assert max(r["step"] for r in read_metrics(run_dir)) == 6
