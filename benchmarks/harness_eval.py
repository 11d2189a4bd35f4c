"""lm-evaluation-harness speed: our LM (pipeline/results/harness.py) vs the harness's own
Hugging Face backend on the same model and tasks (not a test).

The model is a preset of either family (GPT-2 ``gpt2-mini`` by default, the encoder-decoder
with ``t5-tiny``; random weights: speed does not depend on them), saved as a Hugging Face
directory for the baseline (tests/helpers/hf_backend.py, which gives an untied T5 its own head
back); the tasks are the builtin ones of tests/helpers/harness_tasks.py (multiple choice,
generation, perplexity), offline. For a seq2seq model the backend runs the generation task's
twin, so both generate the same number of tokens. Both LMs are built once; each round
evaluates every task with ours and then theirs, and the table gives the median seconds per
task and the ratio theirs/ours (> 1: ours is faster): for the whole evaluation
(``simple_evaluate``: prompts, metrics and the harness's environment report, ~1 s, included)
and for the LM's requests alone (the task's requests, built once, through the LM's
``loglikelihood`` / ``generate_until`` / ``loglikelihood_rolling``).

    python benchmarks/harness_eval.py [--config gpt2-mini|t5-tiny] [--batch-size 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers

import torch  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager, get_task_dict  # noqa: E402
from zeroforge.data_prep.tokenize import get_encoding  # noqa: E402
from zeroforge.pipeline import registry  # noqa: E402
from zeroforge.pipeline.results.export import write_gpt2_tokenizer_files  # noqa: E402
from zeroforge.pipeline.results.harness import ZeroforgeLM, task_manager  # noqa: E402

from tests.helpers.harness_tasks import GEN, MC, PPL, hf_backend_task, write_tasks  # noqa: E402
from tests.helpers.hf_backend import hf_backend  # noqa: E402


def family_of_preset(name: str) -> registry.Family:
    for family in registry.FAMILIES.values():
        if name in family.config_cls.PRESETS:
            return family
    presets = sorted(p for f in registry.FAMILIES.values() for p in f.config_cls.PRESETS)
    raise SystemExit(f"--config: no model preset {name!r}; choose one of {presets}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="gpt2-mini",
                   help="model preset of either family (default gpt2-mini; t5-tiny)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="zf-harness-bench-") as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        family = family_of_preset(args.config)
        model = family.build(family.config_cls.preset(args.config)).eval()
        family.save_hf(model, tmp / "hf")
        write_gpt2_tokenizer_files(tmp / "hf")
        manager = task_manager(str(write_tasks(tmp / "tasks")))
        ours = ZeroforgeLM(model, family, get_encoding("gpt2"), args.batch_size)
        theirs = hf_backend(tmp / "hf", args.batch_size)
        times: dict[tuple[str, str, str], list[float]] = {}
        for _ in range(args.rounds):
            for task in (MC, GEN, PPL):
                for name, lm, name_of_task in (
                        ("ours", ours, task),
                        ("hf", theirs, hf_backend_task(task, family.lm.backend))):
                    t0 = time.perf_counter()
                    simple_evaluate(model=lm, tasks=[name_of_task], task_manager=manager,
                                    log_samples=False, bootstrap_iters=0)
                    times.setdefault((task, name, "task"), []).append(time.perf_counter() - t0)
                    kind, instances = requests(name_of_task, manager)
                    t0 = time.perf_counter()
                    getattr(lm, kind)(instances, disable_tqdm=True)
                    times.setdefault((task, name, "requests"), []).append(
                        time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{family.name} {args.config} ({n_params / 1e6:.1f}M params), batch {args.batch_size}, "
          f"{args.rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print("| task | timed | ours s | hf backend s | hf / ours |")
    print("|---|---|---|---|---|")
    for task in (MC, GEN, PPL):
        for what in ("task", "requests"):
            a = statistics.median(times[(task, "ours", what)])
            b = statistics.median(times[(task, "hf", what)])
            print(f"| {task} | {what} | {a:.2f} | {b:.2f} | **{b / a:.2f}** |")


def requests(task: str, manager: TaskManager) -> tuple[str, list[Instance]]:
    """The task's requests as the evaluator builds them, and their kind (the LM method)."""
    built = get_task_dict([task], manager)[task]
    built.build_all_requests(rank=0, world_size=1)
    return built.instances[0].request_type, built.instances


if __name__ == "__main__":
    main()
