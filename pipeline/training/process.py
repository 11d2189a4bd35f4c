"""The torch side of a rank's process: joining the process group, seeding, RNG state."""

from __future__ import annotations

import os
import random
from typing import Any

import deepspeed
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from zeroforge.pipeline.dist import DistEnv, export_torch_env, free_port


def init_distributed(d: DistEnv) -> str:
    """Join the process group (gloo on CPU, NCCL on CUDA); returns the device name."""
    if d.source == "single" and "MASTER_PORT" not in os.environ:
        # A lone process still needs a (1-rank) group for DeepSpeed; avoid a fixed port that
        # a concurrent run may hold.
        d = DistEnv(master_port=free_port())
    export_torch_env(d)
    accel = get_accelerator()
    on_gpu = accel.device_name() == "cuda" and torch.cuda.is_available()
    backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        torch.cuda.set_device(d.local_rank)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               rank=d.rank, world_size=d.world_size)
    return f"cuda:{d.local_rank}" if on_gpu else "cpu"


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
