"""Time to the first optimizer step of ``zeroforge train`` (not a test), with warm caches.

    python benchmarks/startup.py                 # gpt2-tiny-cpu: 1 rank, 2 ranks; 3 repeats
    python benchmarks/startup.py --repeats 5 --launchers zeroforge deepspeed

Each variant runs once untimed (DeepSpeed's JIT op, the tokenizer cache, the page cache), then
``--repeats`` times. The time is wall clock from starting the command to the moment rank 0
logs ``time to first step:`` (pipeline/training/startup.py), whose breakdown says where a
rank's time went: python and imports, process group, model and engine, first step, ... For
2 ranks, ``launch`` is what the launcher chain added before rank 0's process existed.

Baseline, in the same run: a plain PyTorch script that imports torch, builds the same model,
torch's AdamW, and takes one step on a random batch of the same shape (what nanoGPT does
before its first step, minus data). ``ratio`` = median / the baseline's median.
Targets (issue 9): 5 s with 1 rank, 10 s with 2 ranks.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LINE = re.compile(r"time to first step: ([\d.]+) s \((.*)\)")
BASELINE = """
import time, psutil
started = psutil.Process().create_time()
import torch
from zeroforge.model import GPT2, GPT2Config
model = GPT2(GPT2Config.preset("gpt2-tiny"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
x = torch.randint(0, 50257, ({batch}, {seq}))
model(x, x).backward()
opt.step()
print(f"time to first step: {{time.time() - started:.1f}} s (plain)", flush=True)
"""


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, dict[str, float]]:
    """(seconds from start to the first-step line, that line's phases); the run then ends."""
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    found: list[tuple[float, str]] = []
    tail: list[str] = []

    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            tail[:] = (tail + [line])[-20:]
            if not found and (m := LINE.search(line)):
                found.append((time.time() - t0, m.group(2)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = p.wait(timeout=600)
    reader.join(timeout=10)
    if code != 0 or not found:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {code}:\n{''.join(tail)}")
    seconds, phases = found[0]
    parts = {}
    for item in phases.split(", "):
        name, _, value = item.rpartition(" ")
        if name:
            parts[name] = float(value)
    return seconds, parts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--launchers", nargs="*", default=["zeroforge"],
                    help="launchers for the 2-rank variant (zeroforge, deepspeed, torchrun)")
    ap.add_argument("--store", help="a token store (default: builtin pydoc topics, built once)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_step import token_store  # the benchmarks' cached builtin store

    store = args.store or str(token_store("builtin:pydoc-topics"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_dir = Path(tempfile.mkdtemp(prefix="zf-startup-"))
    def train(run: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "zeroforge.launch", "train", "--config", "gpt2-tiny-cpu",
                f"data.store={store}", f"run_dir={run}", "train.max_steps=1",
                "data.val_windows=0", "tracking.backend=none", *extra]

    variants = {"plain PyTorch (baseline)": lambda run: [
                    sys.executable, "-c", BASELINE.format(batch=4, seq=64)],
                "zeroforge, 1 rank": train}
    for launcher in args.launchers:
        variants[f"zeroforge, 2 ranks ({launcher})"] = (
            lambda run, launcher=launcher: train(run, "--nproc", "2", "--launcher", launcher))
    results: dict[str, list[tuple[float, dict[str, float]]]] = {}
    for v, (name, command) in enumerate(variants.items()):
        for i in range(args.repeats + 1):  # the first run warms the caches
            timing = _timed(command(str(run_dir / f"{v}-{i}")), env)
            if i:
                results.setdefault(name, []).append(timing)
    base = statistics.median(t for t, _ in results["plain PyTorch (baseline)"])
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"{args.repeats} repeats, median")
    print(f"{'variant':<34} {'seconds':>8} {'ratio':>6}  where rank 0's time went")
    for name, runs in results.items():
        seconds = statistics.median(t for t, _ in runs)
        median_run = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        phases = dict(median_run[1])
        if "2 ranks" in name:
            phases = {"launch": median_run[0] - sum(phases.values()), **phases}
        where = ", ".join(f"{k} {v:.1f}" for k, v in phases.items() if v >= 0.05)
        print(f"{name:<34} {seconds:>8.1f} {seconds / base:>6.2f}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
