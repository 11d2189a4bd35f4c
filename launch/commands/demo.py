"""`zeroforge demo`: the whole pipeline on the builtin offline corpus, on CPU, in a few minutes.

prep (this Python's pydoc topic texts) -> train a tiny GPT-2 with 2 DeepSpeed CPU ranks (MLflow
in an embedded store) -> eval -> sample. Each stage runs as the `zeroforge` command a user would
type, so the demo doubles as a recipe; the commands are logged as they run.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
from pathlib import Path

from zeroforge.pipeline.errors import ZeroforgeError

log = logging.getLogger("zeroforge.demo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="where the store and the run go (default runs/demo)")
    p.add_argument("--nproc", type=int, default=2, help="DeepSpeed ranks (default 2)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--prompt", default="The with statement", help="prompt for the sample at the end")


def _zeroforge(*args: str) -> None:
    cmd = [sys.executable, "-m", "zeroforge.launch", *args]
    log.info("$ zeroforge %s", shlex.join(args))
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise ZeroforgeError(f"`zeroforge {args[0]}` failed with exit code {result.returncode}",
                             result.returncode)


def run(args) -> int:
    out = Path(args.out).resolve()
    store, run_dir = out / "store", out / "run"
    _zeroforge("prep", "builtin:pydoc-topics", "--out", str(store), "--val-fraction", "0.1")
    _zeroforge("inspect", str(store))
    overrides = [
        f"run_dir={run_dir}",
        f"data.store={store}",
        f"train.max_steps={args.steps}",
        f"train.eval_every={max(args.steps // 4, 1)}",
        f"checkpoint.every={max(args.steps // 2, 1)}",
        "tracking.backend=mlflow",
        "tracking.experiment=zeroforge-demo",
    ]
    _zeroforge("train", "--config", "gpt2-tiny-cpu", "--nproc", str(args.nproc), *overrides)
    _zeroforge("eval", "--config", "gpt2-tiny-cpu", *overrides)
    _zeroforge("sample", "--checkpoint", str(run_dir), "--prompt", args.prompt, "--max-new-tokens", "40")
    print(
        "\nDone. The run is tracked in an embedded MLflow store; browse it with:\n"
        f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///{run_dir}/mlflow.db\n"
        "then open http://127.0.0.1:5000 (experiment 'zeroforge-demo')."
    )
    return 0
