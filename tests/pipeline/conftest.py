"""Shared pieces of the in-process training tests: one world-size-1 process group over gloo for
the whole session, a real token store of the builtin pydoc corpus, and a helper that runs setup +
fit in this process with a real DeepSpeed engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
from zeroforge.data_prep.build import PrepOptions, build_store
from zeroforge.pipeline.config import load_run_config
from zeroforge.pipeline.dist import PreemptionFlag, discover
from zeroforge.pipeline.tracking.tracker import tracking_status
from zeroforge.pipeline.training.loop import fit
from zeroforge.pipeline.training.process import init_distributed
from zeroforge.pipeline.training.setup import setup
from zeroforge.pipeline.training.state import Run

# gpt2-tiny-cpu as small as a meaningful run gets (as tests/e2e's tiny_overrides).
TINY = ["data.seq_len=32", "data.val_windows=4", "train.micro_batch_size=2",
        "train.grad_accum=1", "train.eval_every=0", "train.sample_tokens=0",
        "tracking.backend=none", "optim.warmup_steps=2", "optim.lr=3e-3"]


@pytest.fixture(scope="session")
def device():
    """One world-size-1 gloo process group for the whole session: DeepSpeed caches its groups
    (deepspeed.utils.groups), so a group destroyed and created again by a later test module
    leaves it asking torch about a group that no longer exists."""
    device = init_distributed(discover())
    yield device
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s"
    build_store(["builtin:pydoc-topics"], out, PrepOptions(val_fraction=0.1, progress=False))
    return out


def train_in_process(store: Path, run_dir: Path, device: str, *overrides: str,
                     config: str = "gpt2-tiny-cpu", keep: bool = False) -> tuple[Run, int]:
    """setup + fit of ``config`` with ``TINY`` and ``overrides``; returns (run, exit code).
    The loader is closed afterwards; ``keep`` leaves the engine for the test to inspect."""
    cfg = load_run_config(config, [f"data.store={store}", f"run_dir={run_dir}", *TINY,
                                   *overrides])
    run = setup(cfg, discover(), device)
    try:
        with tracking_status(run.tracker):
            code = fit(run, PreemptionFlag())
    finally:
        run.loader.close()
        run.metrics.close()
        run.progress.close()
    if not keep:
        run.engine = None
    return run, code
