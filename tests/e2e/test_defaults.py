"""Defaults that work: a new user's first two commands, exactly as typed, with no extra flag.

    zeroforge prep corpus.jsonl --out S
    zeroforge train --config gpt2-tiny-cpu data.store=S

prep keeps a small val share by default (1% of the documents, at least one), so the recipe's
evaluations run. A store without a usable val split (built with --val-fraction 0) trains
without evaluation and says so, unless early stopping needs the evaluations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest
from zeroforge.pipeline.errors import EXIT_CONFIG
from zeroforge.pipeline.tracking.metrics_file import read_metrics

ZEROFORGE = str(Path(sys.executable).with_name("zeroforge"))


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ZEROFORGE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    """A directory holding a user's corpus.jsonl: this Python's pydoc topics, one per line."""
    d = tmp_path_factory.mktemp("user")
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": topics[k]}) + "\n"
                                            for k in sorted(topics)))
    return d


def test_prep_then_train_with_no_extra_flag(user_dir):
    p = _run(user_dir, "prep", "corpus.jsonl", "--out", "S")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "val: 1 docs" in p.stderr  # none hashed to val: the last document went there
    p = _run(user_dir, "train", "--config", "gpt2-tiny-cpu", "data.store=S")
    assert p.returncode == 0, p.stderr[-4000:]
    records = read_metrics(user_dir / "runs" / "gpt2-tiny-cpu")  # the recipe's run_dir
    assert [r["step"] for r in records if "val/loss" in r] == [25, 50]  # eval_every: 25
    assert "Traceback" not in p.stderr


def test_store_without_val_split_trains_without_evaluation(user_dir):
    p = _run(user_dir, "prep", "corpus.jsonl", "--out", "S0", "--val-fraction", "0")
    assert p.returncode == 0, p.stderr[-3000:]
    base = ["train", "--config", "gpt2-tiny-cpu", "data.store=S0", "train.max_steps=2",
            "train.eval_every=1"]
    p = _run(user_dir, *base, "run_dir=r0")
    assert p.returncode == 0, p.stderr[-4000:]
    assert ("has no val window for task gpt (data.seq_len=64; its val split: 0 documents, "
            "0 tokens)") in p.stderr
    assert "Training WITHOUT evaluation" in p.stderr
    records = read_metrics(user_dir / "r0")
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    assert not any("val/loss" in r for r in records)
    # Early stopping cannot work without evaluations: a config error naming it.
    p = _run(user_dir, *base, "run_dir=r1", "train.early_stopping_patience=1")
    assert p.returncode == EXIT_CONFIG
    assert p.stderr.strip().splitlines()[-1].startswith(
        "zeroforge train: error: train.early_stopping_patience needs evaluation: "
        "data.val_windows: store S0 has no val window")
