"""setup + fit in this process, world size 1 over gloo: the loop without any subprocess, with a
real DeepSpeed engine and a real token store built from the builtin pydoc corpus. A run stopped
at step 3 and resumed to step 6 gives the same losses and weights as an uninterrupted one."""

from __future__ import annotations

import math

import torch
from zeroforge.pipeline.errors import EXIT_OK
from zeroforge.pipeline.tracking.metrics_file import read_metrics
from zeroforge.pipeline.training import checkpoint as ckpt

from tests.pipeline.conftest import train_in_process


def _train(store, run_dir, device, max_steps):
    run, code = train_in_process(
        store, run_dir, device, "train.grad_accum=2", f"train.max_steps={max_steps}",
        "checkpoint.every=3", "optim.decay_steps=6", "optim.warmup_steps=2",
        "optim.lr=1e-3", "deepspeed.zero_optimization.stage=1", keep=True)
    assert code == EXIT_OK
    return run, [p.detach().clone() for p in run.engine.module.parameters()]


def test_fit_in_process_and_exact_resume(store, device, tmp_path):
    full, w_full = _train(store, tmp_path / "full", device, 6)
    assert full.state.step == 6 and [s for s, _ in ckpt.committed(full.ckpt_dir)] == [3, 6]
    first, _ = _train(store, tmp_path / "split", device, 3)
    resumed, w_resumed = _train(store, tmp_path / "split", device, 6)
    assert first.state.step == 3 and resumed.state.step == 6

    def losses(run_dir):
        return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}

    assert sorted(losses(tmp_path / "full")) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for v in losses(tmp_path / "full").values())
    assert losses(tmp_path / "split") == losses(tmp_path / "full")  # bitwise, steps 4-6 too
    for a, b in zip(w_resumed, w_full, strict=True):
        assert torch.equal(a, b)
    val = [r for r in read_metrics(tmp_path / "full") if "val/loss" in r]
    assert [r["step"] for r in val] == [6] and val[0]["val/tokens"] == 4 * 32


def test_training_from_s3_gives_the_same_losses_as_from_disk(store, device, tmp_path, s3_server,
                                                              monkeypatch):
    """The same store, on local disk and in a bucket of a real S3 server: bitwise the same
    losses and weights (the read-ahead, the chunk cache and the ranged GETs change nothing)."""
    from zeroforge.data_prep.locations import open_storage

    s3_server.use(monkeypatch)
    monkeypatch.setenv("ZEROFORGE_CACHE_DIR", str(tmp_path / "cache"))
    url = s3_server.new_bucket() + "/pydoc"
    remote = open_storage(url)
    for f in sorted(p for p in store.rglob("*") if p.is_file()):
        remote.write(f.relative_to(store).as_posix(), f.read_bytes())
    _, w_disk = _train(store, tmp_path / "disk", device, 6)
    run, w_s3 = _train(url, tmp_path / "s3", device, 6)
    assert not run.loader.windows.stores[0].local

    def losses(run_dir):
        return [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in read_metrics(run_dir)]

    assert losses(tmp_path / "s3") == losses(tmp_path / "disk")
    for a, b in zip(w_s3, w_disk, strict=True):
        assert torch.equal(a, b)
    assert any((tmp_path / "cache").rglob("*")), "the run read no chunk through the cache"
