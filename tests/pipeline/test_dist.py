"""Rank discovery from each launcher's environment, seeding, the preemption flag."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch
from zeroforge.pipeline.dist import PreemptionFlag, discover, export_torch_env, first_slurm_host
from zeroforge.pipeline.training.process import rng_state, seed_everything, set_rng_state


def test_single_process():
    d = discover({})
    assert (d.rank, d.world_size, d.local_rank, d.node_rank, d.source) == (0, 1, 0, 0, "single")


def test_deepspeed_launcher():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
           "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29600"}
    d = discover(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank) == (3, 4, 1, 2, 1)
    assert (d.master_addr, d.master_port, d.source) == ("node0", 29600, "deepspeed")


def test_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "GROUP_RANK": "1", "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    d = discover(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank) == (5, 8, 1, 4, 1)
    assert d.source == "torchrun"


def test_slurm_srun():
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
           "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NODELIST": "gpu[03-04,09]",
           "SLURM_JOB_ID": "123456"}
    d = discover(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank) == (6, 8, 2, 4, 1)
    assert d.master_addr == "gpu03" and d.master_port == 20000 + 123456 % 20000
    assert d.source == "slurm"
    # An explicit MASTER_ADDR/PORT wins; a launcher's RANK wins over Slurm's variables.
    d = discover({**env, "MASTER_ADDR": "x", "MASTER_PORT": "7"})
    assert (d.master_addr, d.master_port) == ("x", 7)
    assert discover({**env, "RANK": "0", "WORLD_SIZE": "2"}).source == "env"


@pytest.mark.parametrize("nodelist,first", [("a1", "a1"), ("n[1-3]", "n1"),
                                            ("gpu[07,09],cpu1", "gpu07"), ("x-1,x-2", "x-1")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_openmpi():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
           "MASTER_ADDR": "head"}
    d = discover(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank) == (2, 4, 0, 2, 1)
    assert d.source == "mpi" and d.master_addr == "head"
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        discover({k: v for k, v in env.items() if k != "MASTER_ADDR"})


def test_bad_environment_is_named():
    with pytest.raises(ValueError, match="rank 4 not in"):
        discover({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="SLURM_PROCID='x'"):
        discover({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"})


def test_export_round_trip():
    env: dict[str, str] = {}
    d = discover({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
                  "SLURM_NTASKS_PER_NODE": "2"})
    export_torch_env(d, env)
    assert discover(env).rank == 1 and env["WORLD_SIZE"] == "2" and env["LOCAL_RANK"] == "1"


def test_seed_and_rng_state_round_trip():
    seed_everything(7)
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    seed_everything(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_preemption_flag_records_signals():
    flag = PreemptionFlag().install()
    try:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and flag.signum == signal.SIGUSR1
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
