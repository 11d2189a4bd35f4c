"""Process-level plumbing: who am I (rank discovery), seeding, preemption signals, exit codes.

Rank discovery reads the environment of whichever launcher started us, first match wins:

    deepspeed launcher   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT (+ CROSS_RANK = node)
    torchrun             RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK = node
    Slurm srun           SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, node list
    OpenMPI mpirun       OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE
    nothing              a single process (rank 0 of 1)

and ``export_torch_env`` writes the result back as RANK/WORLD_SIZE/... so torch's ``env://``
rendezvous works under all of them. Importing this module does not import torch.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Exit codes of `zeroforge train` (one home; launch/ and docs/training.md refer to these).
EXIT_OK = 0
EXIT_FAILED = 1  # crash, too many non-finite steps, unloadable checkpoint
EXIT_CONFIG = 2  # bad config / command line (the message names the key)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving a checkpoint; requeue

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    source: str = "single"  # deepspeed | torchrun | env | slurm | mpi | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {key} is required by this launcher")
        return default
    try:
        return int(raw.split("(")[0])  # Slurm writes e.g. SLURM_TASKS_PER_NODE=2(x3)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``gpu[03-05,09],cpu1`` -> ``gpu03``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def discover(env: Mapping[str, str] | None = None) -> DistEnv:
    """Rank/world/local rank/node rank/master address of this process (see module doc)."""
    env = os.environ if env is None else env
    port = _int(env, "MASTER_PORT", DEFAULT_MASTER_PORT)
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK", 0)
        if "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env:
            source = "torchrun"
            local_world = _int(env, "LOCAL_WORLD_SIZE", world)
            node = _int(env, "GROUP_RANK", rank // max(local_world, 1))
        elif "CROSS_RANK" in env:
            source = "deepspeed"
            local_world = _int(env, "LOCAL_SIZE", world)
            node = _int(env, "CROSS_RANK", 0)
        else:
            source = "env"
            local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE", world))
            node = rank // max(local_world, 1)
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        source = "slurm"
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
        local = _int(env, "SLURM_LOCALID", 0)
        local_world = _int(env, "SLURM_STEP_TASKS_PER_NODE",
                           _int(env, "SLURM_NTASKS_PER_NODE", world))
        node = _int(env, "SLURM_NODEID", 0)
        if "MASTER_ADDR" not in env:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            addr = first_slurm_host(nodelist) if nodelist else "127.0.0.1"
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            # Derive the port from the job id so concurrent jobs on a node do not collide.
            port = 20000 + _int(env, "SLURM_JOB_ID") % 20000
    elif "OMPI_COMM_WORLD_RANK" in env:
        source = "mpi"
        rank = _int(env, "OMPI_COMM_WORLD_RANK")
        world = _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0)
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world)
        node = _int(env, "OMPI_COMM_WORLD_NODE_RANK", rank // max(local_world, 1))
        if "MASTER_ADDR" not in env and local_world < world:
            raise ValueError("MPI launch across nodes: set MASTER_ADDR (e.g. mpirun -x "
                             "MASTER_ADDR=<first host>)")
    else:
        return DistEnv(master_addr=addr, master_port=port)
    problems = []
    if world < 1:
        problems.append(f"world size {world} must be >= 1")
    if not 0 <= rank < world:
        problems.append(f"rank {rank} not in [0, {world})")
    if not 0 <= local < max(local_world, 1):
        problems.append(f"local rank {local} not in [0, {local_world})")
    if problems:
        raise ValueError(f"inconsistent {source} environment: " + "; ".join(problems))
    return DistEnv(rank, world, local, local_world, node, addr, port, source)


def export_torch_env(d: DistEnv, environ: dict[str, str] | None = None) -> None:
    """Write ``d`` as the variables torch's env:// rendezvous reads."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    environ.update({
        "RANK": str(d.rank), "WORLD_SIZE": str(d.world_size), "LOCAL_RANK": str(d.local_rank),
        "LOCAL_WORLD_SIZE": str(d.local_world_size), "MASTER_ADDR": d.master_addr,
        "MASTER_PORT": str(d.master_port),
    })


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(d: DistEnv) -> str:
    """Join the process group (gloo on CPU, NCCL on CUDA); returns the device name."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

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


# ----------------------------------------------------------------------------- seeding / RNG


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with ``seed``."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- preemption


class PreemptionFlag:
    """Records SIGTERM/SIGUSR1 instead of dying; the loop agrees on it at a step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handler(self, signum: int, frame: object) -> None:
        self.signum = signum

    def install(self) -> PreemptionFlag:
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
