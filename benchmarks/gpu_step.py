"""Throughput of zeroforge's own training step on one GPU (not a test): GPT-2 124M and 350M at
context 1024 and T5-base (512 encoder / 114 decoder tokens) in bf16.

    python benchmarks/gpu_step.py                          # the three configs, on the GPU
    python benchmarks/gpu_step.py --configs gpt2-124m --micro-batch gpt2-124m=32 --no-compile
    python benchmarks/gpu_step.py --smoke                  # tiny configs on CPU (CI runs this)
    python benchmarks/gpu_step.py --json                   # one JSON object per config

Each config runs in a child process, built as ``zeroforge train`` builds a run: the shipped
recipe plus overrides (``train.grad_accum=1``, ``train.precision=bf16``, no tracking, no
evaluation), ``setup()`` (the DeepSpeed engine from ds_config.json at the recipe's ZeRO stage,
torch's fused AdamW), the prefetching loader over a token store of the builtin stdlib corpus
(built once into ``~/.cache/zeroforge/bench``), and ``train_step`` itself with its schedule
``set_lr``. After ``--warmup`` steps (compilation happens there) it times ``--steps`` steps
between two device synchronisations and prints per config:

    step ms    wall time per optimizer step (micro batch x 1)
    tokens/s   tokens fed to the model (GPT: inputs; T5: encoder + decoder)
    MFU        model FLOPs (model/flops.py: 6N + attention, PaLM convention) per second over
               989 TFLOP/s, the dense bf16 peak of one H100/H200 SXM (``--peak-tflops``)
    peak GiB   torch.cuda.max_memory_allocated over the timed steps

Targets (issue 9): GPT-2 124M at >= 50% MFU; T5-base at batch 128 in <= 0.35 s per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zeroforge.pipeline.dist import free_port

H100_BF16_TFLOPS = 989.0
CACHE = Path(os.environ.get("ZEROFORGE_BENCH_CACHE",
                           Path.home() / ".cache" / "zeroforge" / "bench"))


@dataclasses.dataclass(frozen=True)
class Case:
    recipe: str  # a shipped recipe (configs/)
    micro_batch: int
    target: str = ""
    extra: tuple[str, ...] = ()


CASES = {
    "gpt2-124m": Case("gpt2-124m", 16, "MFU >= 50%"),
    "gpt2-350m": Case("gpt2-350m", 8),
    "t5-base": Case("t5-base", 128, "step <= 0.35 s"),  # seq_len 512 -> decoder 114
}
# CPU smoke: the same path with tiny models, a short context and the builtin pydoc corpus.
SMOKE = {
    "gpt2-tiny-cpu": Case("gpt2-tiny-cpu", 2, extra=("data.seq_len=32",)),
    "t5-tiny-cpu": Case("t5-tiny-cpu", 2, extra=("data.seq_len=32",)),
}


def token_store(corpus: str) -> Path:
    """A token store of a builtin corpus, built once (an interrupted build resumes)."""
    from zeroforge.data_prep.build import PrepOptions, build_store
    from zeroforge.data_prep.store import StoreError, TokenStore

    out = CACHE / corpus.replace(":", "-")
    try:
        TokenStore.open(out)
    except (StoreError, FileNotFoundError, ValueError):
        CACHE.mkdir(parents=True, exist_ok=True)
        build_store([corpus], out, PrepOptions(val_fraction=0.01, progress=False,
                                               workers=min(8, os.cpu_count() or 1)))
    return out


def measure(case: Case, store: Path, steps: int, warmup: int, compile_model: bool,
            peak_tflops: float) -> dict:
    """One config in this process: setup as ``zeroforge train`` does, then time train_step."""
    import torch
    from zeroforge.model import mfu
    from zeroforge.pipeline.config import load_run_config
    from zeroforge.pipeline.dist import PreemptionFlag, discover
    from zeroforge.pipeline.training.optim import lr_at, set_lr
    from zeroforge.pipeline.training.process import init_distributed
    from zeroforge.pipeline.training.setup import setup
    from zeroforge.pipeline.training.step import train_step

    device = init_distributed(discover())
    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_run_config(case.recipe, [
            f"data.store={store}", f"run_dir={run_dir}", "data.val_windows=0",
            f"train.micro_batch_size={case.micro_batch}", "train.grad_accum=1",
            "train.precision=bf16", f"train.compile={str(compile_model).lower()}",
            "train.sample_tokens=0", "tracking.backend=none", "train.log_every=1000000",
            *case.extra])
        run = setup(cfg, discover(), device)
        batches, preempt = iter(run.loader), PreemptionFlag()

        def one_step() -> float:
            set_lr(run.engine.optimizer, lr_at(run.state.step, cfg.optim, cfg.train.max_steps))
            result = train_step(run, batches, preempt)
            run.state.step += 1
            return result.loss

        try:
            for _ in range(warmup):
                one_step()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = one_step()  # its one host sync per step is part of the cost
            if cuda:
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / steps
        finally:
            run.loader.close()
            run.metrics.close()
            run.progress.close()
        name = torch.cuda.get_device_name() if cuda else "cpu"
        layout = run.task.layout
        return {
            "config": case.recipe, "device": name, "params_m": run.n_params / 1e6,
            "batch": case.micro_batch, "seq": f"{layout.input_len}"
            + (f"/{layout.target_len}" if layout.target_len else ""),
            "zero": run.engine.zero_optimization_stage(), "compile": compile_model,
            "step_ms": dt * 1e3, "tokens_per_s": run.loader.tokens_per_global_step / dt,
            "mfu": mfu(run.flops_per_step / dt, 1.0, peak_tflops=peak_tflops) if cuda else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "loss": loss, "target": case.target,
        }


def _row(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
    return (f"{r['config']:<14} {r['params_m']:>7.1f}M {r['batch']:>5} {r['seq']:>8} "
            f"{r['zero']:>4} {'yes' if r['compile'] else 'no':>7} {r['step_ms']:>9.1f} "
            f"{r['tokens_per_s']:>11,.0f} {mfu:>7} {mem:>8}  {r['target']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configs on CPU, 2 steps")
    ap.add_argument("--configs", nargs="*", help=f"subset of {sorted(CASES)}")
    ap.add_argument("--micro-batch", nargs="*", default=[], metavar="CONFIG=N")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; smoke 1)")
    ap.add_argument("--no-compile", action="store_true", help="eager (default: torch.compile)")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS)
    ap.add_argument("--json", action="store_true", help="one JSON object per config")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one config as JSON, in this process
    args = ap.parse_args()
    cases = SMOKE if args.smoke else CASES
    steps = args.steps or (2 if args.smoke else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    compile_model = not (args.no_compile or args.smoke)  # inductor on CPU: minutes, not CI
    if args.child:
        case = Case(**json.loads(args.child))
        store = token_store("builtin:pydoc-topics" if args.smoke else "builtin:stdlib")
        print("RESULT " + json.dumps(measure(case, store, steps, warmup, compile_model,
                                             args.peak_tflops)), flush=True)
        return 0

    chosen = {name: cases[name] for name in (args.configs or cases)}
    for item in args.micro_batch:
        name, _, n = item.partition("=")
        chosen[name] = dataclasses.replace(chosen[name], micro_batch=int(n))
    if not args.json:
        print(f"{'config':<14} {'params':>8} {'batch':>5} {'seq':>8} {'zero':>4} {'compile':>7} "
              f"{'step ms':>9} {'tokens/s':>11} {'MFU':>7} {'peak GiB':>8}  target")
    failed = 0
    for case in chosen.values():
        cmd = [sys.executable, __file__, "--child", json.dumps(dataclasses.asdict(case)),
               "--steps", str(steps), "--warmup", str(warmup),
               "--peak-tflops", str(args.peak_tflops)]
        cmd += ["--smoke"] if args.smoke else []
        cmd += [] if compile_model else ["--no-compile"]
        # A fresh process per config: its own process group (on a port of its own: a port in
        # this process's environment may be held by the caller's group), no memory left from
        # the last one.
        env = {**os.environ, "MASTER_PORT": str(free_port())}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        results = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not results:
            failed += 1
            print(f"{case.recipe:<14} failed (exit {p.returncode}): "
                  f"{(p.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = json.loads(results[-1].removeprefix("RESULT "))
        print(json.dumps(r) if args.json else f"{_row(r)}  [{r['device']}]", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
