"""Benchmarks that CI runs in a small form: ``benchmarks/gpu_step.py --smoke`` drives the same
code path as on a GPU (recipe -> setup -> DeepSpeed engine -> train_step, bf16) with tiny
GPT-2 and T5 configs on CPU. (Its GPU figures: docs/performance.md.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_step_smoke_runs_on_cpu(tmp_path):
    env = {**os.environ, "ZEROFORGE_BENCH_CACHE": str(tmp_path)}
    p = subprocess.run([sys.executable, "benchmarks/gpu_step.py", "--smoke", "--json"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [r["config"] for r in rows] == ["gpt2-tiny-cpu", "t5-tiny-cpu"]
    for r in rows:
        assert r["device"] == "cpu" and r["step_ms"] > 0 and r["tokens_per_s"] > 0
        assert math.isfinite(r["loss"]) and r["mfu"] is None  # no peak known for a CPU
    assert rows[1]["seq"] == "32/8"  # encoder / decoder tokens of span corruption
