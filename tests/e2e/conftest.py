"""Real multi-process training runs for the e2e tests: a tiny token store and a launcher helper.

Every run is a real `deepspeed --num_gpus N --module zeroforge.launch train` (CPU ranks over gloo) of
configs/gpt2-tiny-cpu.yaml shrunk further by overrides. Each launch costs several seconds of
startup on 2 cores, so tests share runs through module-scoped fixtures.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from zeroforge.launch.local import is_rank
from zeroforge.pipeline.tracking.metrics_file import read_metrics

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
TINY_CONFIG = str(REPO / "configs" / "gpt2-tiny-cpu.yaml")
RUN_TIMEOUT_S = 240
PROGRESS_STEP = re.compile(r"zeroforge\.train: step (\d+)/")  # rank 0's progress line


def _remove_deepspeed_shm() -> None:
    # DeepSpeed's CPU all-reduce keeps buffers in /dev/shm (tens of MB per run) and does not
    # always remove them; over many runs they filled this machine's RAM (/dev/shm is tmpfs).
    for buf in Path("/dev/shm").glob("deepspeed_*"):
        buf.unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def deepspeed_shm_cleanup():
    """No launch of ours runs before or after the e2e session: clear leaked buffers both times."""
    _remove_deepspeed_shm()
    yield
    _remove_deepspeed_shm()


@pytest.fixture(scope="session", autouse=True)
def deepspeed_cpu_op(deepspeed_shm_cleanup) -> None:
    """Build DeepSpeed's CPU comm op once, in one process, before any e2e launch.

    Otherwise the first launch's ranks JIT-build it together (~40-60 s on 2 cores) inside a
    launch timeout; and a build killed midway leaves a `lock` file that makes every later build
    wait forever, so a lock that no build holds (none runs yet) is removed first."""
    ext = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    for lock in ext.glob("*/deepspeed_shm_comm/lock"):
        lock.unlink(missing_ok=True)
    build = ("from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder; "
             "ShareMemCommBuilder().load()")
    subprocess.run([PYTHON, "-c", build], check=True, cwd=REPO, capture_output=True, timeout=600)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real token store of this Python's pydoc topic texts (79 documents, ~120k tokens):
    builtin, so every clone runs the end-to-end tests without ../shared."""
    from zeroforge.data_prep.build import PrepOptions, build_store

    out = tmp_path_factory.mktemp("store") / "store"
    build_store(["builtin:pydoc-topics"], out, PrepOptions(tokenizer="gpt2", val_fraction=0.1,
                                                           progress=False))
    return out


def tiny_overrides(store: Path, run_dir: Path, **extra: object) -> list[str]:
    """Overrides making gpt2-tiny-cpu as small as a meaningful run gets."""
    base: dict[str, object] = {
        "data.store": str(store), "run_dir": str(run_dir), "data.seq_len": 32,
        "data.val_windows": 4, "data.prefetch": 2, "train.micro_batch_size": 2,
        "train.grad_accum": 1, "train.log_every": 1, "train.eval_every": 0,
        "train.sample_tokens": 0, "tracking.backend": "none", "optim.warmup_steps": 2,
        "optim.lr": 3e-3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@dataclass
class Result:
    returncode: int
    output: str
    run_dir: Path
    records: list[dict]  # metrics.jsonl as it was when this launch ended

    def metrics(self) -> list[dict]:
        return self.records


def free_port() -> int:
    from zeroforge.pipeline.dist import free_port as fp

    return fp()


def start(run_dir: Path, overrides: list[str], nproc: int = 2, env: dict | None = None,
          config: str = TINY_CONFIG) -> tuple[subprocess.Popen, Path]:
    """Start a run of ``config`` (default gpt2-tiny-cpu) in its own session (so a debug SIGKILL
    of the process group spares pytest)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / f"launch-{time.time_ns()}.log"
    if nproc == 1:
        cmd = [PYTHON, "-m", "zeroforge.launch", "train", "--config", config, *overrides]
    else:
        cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port()),
               "--module", "zeroforge.launch", "train", "--config", config, *overrides]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log


def finish(proc: subprocess.Popen, log: Path, run_dir: Path, timeout: float = RUN_TIMEOUT_S
           ) -> Result:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"run timed out; log:\n{log.read_text()[-5000:]}") from None
    return Result(proc.returncode, log.read_text(), run_dir, read_metrics(run_dir))


def launch(run_dir: Path, overrides: list[str], nproc: int = 2, env: dict | None = None,
           config: str = TINY_CONFIG, timeout: float = RUN_TIMEOUT_S) -> Result:
    proc, log = start(run_dir, overrides, nproc, env, config)
    return finish(proc, log, run_dir, timeout)


def rank_processes(proc: subprocess.Popen) -> dict[int, object]:
    """{local rank: psutil.Process} of the training ranks under a deepspeed launcher."""
    import psutil

    out = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if is_rank(cmd):
            for arg in cmd:
                if arg.startswith("--local_rank="):
                    out[int(arg.split("=")[1])] = child
    return out


def wait_for_step(result_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 180,
                  log: Path | None = None) -> None:
    """Block until metrics.jsonl has a record with ``step`` >= step (or the run ended).

    ``log``: read the steps from this launch's own log (rank 0's progress lines) instead. A
    restart needs it: until its setup rewrites metrics.jsonl, the file still holds the records
    of the run that died, past the checkpoint the restart resumes from."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return
        if log is not None:
            logged = [int(n) for n in PROGRESS_STEP.findall(log.read_text(errors="replace"))]
        else:  # the reader skips a line being written (it reads as a torn last line)
            logged = [r["step"] for r in read_metrics(result_dir)]
        if any(n >= step for n in logged):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def losses(records: list[dict]) -> dict[int, object]:
    """step -> train/loss (the last record of each step wins)."""
    return {r["step"]: r.get("train/loss") for r in records if "train/loss" in r}


def checksums(record: dict) -> list[float]:
    keys = sorted(k for k in record if k.startswith("debug/param_checksum_rank"))
    return [record[k] for k in keys]
