"""Shared pieces of the in-process training tests."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from zeroforge.pipeline.dist import discover
from zeroforge.pipeline.training.process import init_distributed


@pytest.fixture(scope="session")
def device():
    """One world-size-1 gloo process group for the whole session: DeepSpeed caches its groups
    (deepspeed.utils.groups), so a group destroyed and created again by a later test module
    leaves it asking torch about a group that no longer exists."""
    device = init_distributed(discover())
    yield device
    dist.destroy_process_group()
