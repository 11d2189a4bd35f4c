"""The torch side of a rank's process: joining the process group, seeding, RNG state."""

from __future__ import annotations

import os
import random
from datetime import timedelta
from typing import Any

import deepspeed
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.constants import default_pg_timeout
from zeroforge.pipeline.dist import DistEnv, export_torch_env, free_port


def init_distributed(d: DistEnv, timeout_s: float | None = None) -> str:
    """Join the process group (gloo on CPU, NCCL on CUDA) with a collective timeout of
    ``timeout_s`` seconds (``dist.timeout``; None: DeepSpeed's default); returns the device."""
    if d.source == "single" and "MASTER_PORT" not in os.environ:
        # A lone process still needs a (1-rank) group for DeepSpeed; avoid a fixed port that
        # a concurrent run may hold.
        d = DistEnv(master_port=free_port())
    export_torch_env(d)
    _share_cores(d.local_world_size)
    accel = get_accelerator()
    on_gpu = accel.device_name() == "cuda" and torch.cuda.is_available()
    backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        torch.cuda.set_device(d.local_rank)
    timeout = default_pg_timeout if timeout_s is None else timedelta(seconds=timeout_s)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               rank=d.rank, world_size=d.world_size, timeout=timeout)
    return f"cuda:{d.local_rank}" if on_gpu else "cpu"


def use_deterministic_kernels(wanted: bool | None, compiled: bool, device: str) -> bool:
    """``train.deterministic`` for this process (None: on when compiling on CPU); returns it.

    Eager CPU kernels are deterministic anyway. Inductor's generated CPU code is not: it adds
    the gradient rows of repeated token ids (embedding backward) with atomic adds from several
    threads, in a different order each run, unless deterministic algorithms are on; so a
    compiled run is exact on resume only with them. On GPU, cuBLAS needs a fixed workspace for
    deterministic matmuls; it is set here, before its first use.
    """
    on = (compiled and device == "cpu") if wanted is None else wanted
    if on and device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Only when it changes anything: the call imports inductor (~1 s at start-up).
    if on != torch.are_deterministic_algorithms_enabled():
        # warn_only: an op without a deterministic kernel warns instead of stopping the run.
        torch.use_deterministic_algorithms(on, warn_only=True)
    return on


def _share_cores(local_ranks: int) -> None:
    """Ranks on one machine split its cores between their torch thread pools, unless
    OMP_NUM_THREADS says otherwise: each would take all of them, and oversubscribed OpenMP
    threads spin against each other (2 CPU ranks on 2 cores: a step 2-4x slower)."""
    if local_ranks > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // local_ranks))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, ints and tuples only, so that the file loads with
    ``torch.load(weights_only=True)`` (numpy's key array would need unpickling)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    if torch.is_tensor(keys):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
