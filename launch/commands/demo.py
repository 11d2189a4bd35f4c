"""`zeroforge demo`: the whole arc on builtin offline data, on CPU, in a few minutes.

1. pretrain: prep this Python's pydoc topic texts, train a tiny GPT-2 with 2 DeepSpeed CPU ranks
   (MLflow in an embedded store);
2. fine-tune: prep `builtin:pydoc-qa` (section titles and builtin names as prompts, the first
   paragraph of their docs as responses) as an SFT store, and fine-tune the pretrained run on it
   (`init_from`, task sft: packed examples, loss on the responses only);
3. evaluate: the fine-tuned model's loss over the response tokens, and generations for held-out
   prompts with exact match and token F1;
4. sample: answer a prompt, rendered through the store's template.

Each stage runs as the `zeroforge` command a user would type, so the demo doubles as a recipe;
the commands are logged as they run.
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
    p.add_argument("--steps", type=int, default=200, help="pretraining steps (default 200)")
    p.add_argument("--sft-steps", type=int, default=150, help="fine-tuning steps (default 150)")
    p.add_argument("--prompt", default='The "with" statement',
                   help="prompt for the fine-tuned model's sample at the end")


def _zeroforge(*args: str) -> None:
    cmd = [sys.executable, "-m", "zeroforge.launch", *args]
    log.info("$ zeroforge %s", shlex.join(args))
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise ZeroforgeError(f"`zeroforge {args[0]}` failed with exit code {result.returncode}",
                             result.returncode)


def _overrides(run_dir: Path, store: Path, steps: int) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.store={store}",
        f"train.max_steps={steps}",
        f"train.eval_every={max(steps // 4, 1)}",
        f"checkpoint.every={max(steps // 2, 1)}",
        "tracking.backend=mlflow",
        "tracking.experiment=zeroforge-demo",
    ]


def run(args) -> int:
    out = Path(args.out).resolve()
    store, run_dir = out / "store", out / "run"
    sft_store, sft_dir = out / "sft-store", out / "sft-run"
    nproc = ["--nproc", str(args.nproc)]
    # 1. Pretraining.
    _zeroforge("prep", "builtin:pydoc-topics", "--out", str(store), "--val-fraction", "0.1")
    _zeroforge("inspect", str(store))
    pretrain = _overrides(run_dir, store, args.steps)
    _zeroforge("train", "--config", "gpt2-tiny-cpu", *nproc, *pretrain)
    _zeroforge("eval", "--config", "gpt2-tiny-cpu", *pretrain)
    # 2. Fine-tuning from the pretrained run.
    _zeroforge("prep", "builtin:pydoc-qa", "--out", str(sft_store), "--format", "sft",
               "--template", "chat", "--val-fraction", "0.1")
    _zeroforge("inspect", str(sft_store))
    finetune = [*_overrides(sft_dir, sft_store, args.sft_steps), f"init_from={run_dir}"]
    _zeroforge("train", "--config", "gpt2-sft-tiny-cpu", *nproc, *finetune)
    # 3. Evaluation: loss over the response tokens, generations for held-out prompts.
    _zeroforge("eval", "--config", "gpt2-sft-tiny-cpu", *finetune, "--generate", "8",
               "--max-new-tokens", "48")
    # 4. A sample: the prompt goes through the store's chat template.
    _zeroforge("sample", "--checkpoint", str(sft_dir), "--prompt", args.prompt,
               "--max-new-tokens", "48", "--temperature", "0")
    print(
        "\nDone. Both runs are tracked in embedded MLflow stores; browse one with:\n"
        f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///{sft_dir}/mlflow.db\n"
        "then open http://127.0.0.1:5000 (experiment 'zeroforge-demo'). The generations for "
        f"held-out prompts are in {sft_dir}/generations/."
    )
    return 0
