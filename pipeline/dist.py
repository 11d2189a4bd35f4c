"""Process-level plumbing without torch: who am I (rank discovery), node lists, ports, and the
preemption flag. (Joining the process group and RNG state: training/process.py.)

Rank discovery reads the environment of whichever launcher started us, first match wins:

    deepspeed launcher   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT (+ CROSS_RANK = node)
    torchrun             RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK = node
    Slurm srun           SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, node list
    OpenMPI mpirun       OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE
    nothing              a single process (rank 0 of 1)

and ``export_torch_env`` writes the result back as RANK/WORLD_SIZE/... so torch's ``env://``
rendezvous works under all of them.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zeroforge.pipeline.errors import EXIT_INTERRUPTED

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DEFAULT_MASTER_PORT = 29500
# Slurm jobs: the rendezvous port derives from the job id (launch/slurm templates use the same).
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000


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


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...]: ``a[1,3],b`` -> [``a[1,3]``, ``b``]."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    items.append(text[start:])
    return [s for s in (x.strip() for x in items) if s]


def _expand_range(spec: str, where: str) -> list[str]:
    out = []
    for part in spec.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {part!r} in node list {where!r}")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {part!r} in node list {where!r}")
        width = len(lo)  # Slurm keeps the zero padding of the lower bound: 08-10 -> 08 09 10
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list, in order (what `scontrol show hostnames` prints).

    ``gpu[01-03,07],login1`` -> gpu01 gpu02 gpu03 gpu07 login1; several bracket groups in one
    name expand as a product (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2).
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        names = [""]
        for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            if not text and not ranges:
                continue
            values = _expand_range(ranges, nodelist) if ranges else [""]
            names = [n + text + v for n in names for v in values]
        hosts.extend(names)
    if not hosts:
        raise ValueError(f"empty node list {nodelist!r}")
    return hosts


def master_port(job_id: int) -> int:
    """Rendezvous port of a job: unique among concurrent jobs sharing a node (ids are
    consecutive), the same after a requeue (the id stays), and clear of ephemeral ports."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``gpu[03-05,09],cpu1`` -> ``gpu03``."""
    return expand_nodelist(nodelist)[0]


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
            port = master_port(_int(env, "SLURM_JOB_ID"))
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


# ----------------------------------------------------------------------------- preemption


class PreemptionFlag:
    """Records SIGTERM/SIGUSR1 instead of dying; the loop agrees on it at a step boundary.

    Ctrl-C (SIGINT) is a preemption too: the first one stops the run at the next step boundary
    with a checkpoint (exit 75), a second one aborts at once (KeyboardInterrupt: no checkpoint,
    the tracker's run KILLED, exit 130), and a third one ends the process even if it is stuck
    in a collective. ``announce`` (rank 0) says so on stderr at the first one.
    """

    def __init__(self, announce: bool = False) -> None:
        self.signum: int | None = None
        self.interrupts = 0
        self.announce = announce
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handler(self, signum: int, frame: object) -> None:
        self.signum = signum

    def _interrupt(self, signum: int, frame: object) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self.signum = signum
            if self.announce:  # os.write: logging is not safe inside a signal handler
                os.write(2, b"\nzeroforge: Ctrl-C: stopping at the next step boundary with a "
                            b"checkpoint (exit 75); press Ctrl-C again to abort without one\n")
        elif self.interrupts == 2:
            raise KeyboardInterrupt
        else:
            os._exit(EXIT_INTERRUPTED)

    def install(self) -> PreemptionFlag:
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
