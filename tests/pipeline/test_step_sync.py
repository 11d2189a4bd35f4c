"""The micro-batch loop waits for the device once per optimizer step (pipeline/training/step.py).

No GPU here, so nothing really waits; instead a ``TorchFunctionMode`` records, during a real
``train_step`` (DeepSpeed engine, 4 micro-batches), every call from zeroforge's own code that
would make a host wait for a GPU: reading a tensor's value (``item``, ``tolist``, ``bool``,
``float``, ...), a copy to the device that is not ``non_blocking``, a tensor built from host
data on the device. DeepSpeed's own internals are out of scope (docs/performance.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from torch.overrides import TorchFunctionMode
from zeroforge.pipeline.config import load_run_config
from zeroforge.pipeline.dist import PreemptionFlag, discover
from zeroforge.pipeline.training.setup import setup
from zeroforge.pipeline.training.state import Outcome
from zeroforge.pipeline.training.step import train_step

from tests.pipeline.conftest import TINY

REPO = Path(__file__).resolve().parents[2]
OURS = tuple(str(REPO / d) + "/" for d in ("pipeline", "model", "data_prep"))
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}


class HostWaits(TorchFunctionMode):
    """Records (function, file:line) of each call from our code that would wait on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1)
        name = getattr(func, "__name__", str(func))
        if caller.f_code.co_filename.startswith(OURS) and self._waits(name, args, kwargs):
            self.calls.append((name, f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"))
        return func(*args, **kwargs)

    @staticmethod
    def _waits(name, args, kwargs) -> bool:
        if name in READS:
            return True
        if name == "to":  # a device given (not only a dtype) and no non_blocking
            to_device = "device" in kwargs or any(isinstance(a, str) or "device" in
                                                  type(a).__name__ for a in args[1:])
            return to_device and not kwargs.get("non_blocking", False)
        return name == "tensor" and "device" in kwargs


@pytest.mark.parametrize("stage", [0, 2])
def test_one_host_wait_per_optimizer_step(store, device, tmp_path, stage):
    cfg = load_run_config("gpt2-tiny-cpu", [f"data.store={store}", f"run_dir={tmp_path}", *TINY,
                                            "train.grad_accum=4",
                                            f"deepspeed.zero_optimization.stage={stage}"])
    run = setup(cfg, discover(), device)
    batches = iter(run.loader)
    try:
        train_step(run, batches, PreemptionFlag())  # warm-up: first-step allocations
        run.state.step += 1
        waits = HostWaits()
        with waits:
            result = train_step(run, batches, PreemptionFlag())
    finally:
        run.loader.close()
        run.metrics.close()
        run.progress.close()
    assert result.outcome is Outcome.APPLIED
    assert [name for name, _ in waits.calls] == ["tolist"], waits.calls
    assert waits.calls[0][1].startswith("step.py:")
