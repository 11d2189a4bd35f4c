"""Fine-tuning with real 2-rank DeepSpeed CPU runs (gloo, fp32, ZeRO-2) on the builtin
`builtin:pydoc-qa` stores, for both fine-tuning tasks:

- sft (tiny GPT-2, packed examples) and seq2seq (tiny encoder-decoder, length-sorted pairs);
- exact resume: a run SIGKILLed after step 6 (ZEROFORGE_DEBUG_KILL_AFTER_STEP, checkpoint at 4)
  and relaunched reproduces the uninterrupted run's losses for steps 5-8 bitwise and ends with
  identical weights;
- world-size independence: 1 rank with twice the gradient accumulation consumes the same
  samples at every step and gives the same losses (float summation order aside).
"""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import torch
from zeroforge.data_prep.build import PrepOptions, build_store
from zeroforge.data_prep.examples import ExampleOptions
from zeroforge.pipeline.results.weights import read_checkpoint
from zeroforge.pipeline.training import checkpoint as ckpt

from tests.e2e.conftest import PYTHON, REPO, launch, losses, tiny_overrides

# Four launches per task in one fixture: more than the default 600 s on a busy 2-core machine.
pytestmark = pytest.mark.timeout(1500)

STEPS = 8
SAMPLE_IDS = {"ZEROFORGE_DEBUG_SAMPLE_IDS": "1"}
TASKS = {
    "sft": ("gpt2-sft-tiny-cpu.yaml", "sft", {"data.seq_len": 96}),
    "seq2seq": ("t5-seq2seq-tiny-cpu.yaml", "pairs", {"data.seq_len": 48,
                                                      "data.target_len": 96}),
}


def _overrides(store, run_dir, extra, **more):
    return tiny_overrides(store, run_dir, **{
        "init_from": "null", "deepspeed.zero_optimization.stage": 2,
        "train.max_steps": STEPS, "checkpoint.every": 4, "checkpoint.keep_last": 3,
        "train.precision": "fp32", **extra, **more})


def _module_state(run_dir, step):
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.fixture(scope="module", params=sorted(TASKS))
def runs(request, tmp_path_factory):
    recipe, fmt, extra = TASKS[request.param]
    config = str(REPO / "configs" / recipe)
    store = tmp_path_factory.mktemp(f"{fmt}-store") / "s"
    build_store(["builtin:pydoc-qa"], store, PrepOptions(
        val_fraction=0.1, progress=False, examples=ExampleOptions(format=fmt, template="chat")))

    def run(name, nproc=2, env=None, **more):
        run_dir = tmp_path_factory.mktemp(f"{request.param}-{name}")
        return run_dir, lambda e=env: launch(run_dir, _overrides(store, run_dir, extra, **more),
                                             nproc=nproc, env={**SAMPLE_IDS, **(e or {})},
                                             config=config)

    ref_dir, ref_launch = run("reference")
    ref = ref_launch()
    assert ref.returncode == 0, ref.output[-4000:]
    killed_dir, killed_launch = run("killed")
    killed = killed_launch({"ZEROFORGE_DEBUG_KILL_AFTER_STEP": "6"})
    assert killed.returncode != 0 and max(losses(killed.metrics())) == 6
    resumed = killed_launch()
    assert resumed.returncode == 0, resumed.output[-4000:]
    one_dir, one_launch = run("one-rank", nproc=1, **{"train.grad_accum": 2})
    one = one_launch()
    assert one.returncode == 0, one.output[-4000:]
    return request.param, ref, resumed, one


def test_fine_tuning_loss_falls(runs):
    _, ref, _, _ = runs
    curve = losses(ref.metrics())
    assert list(curve) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in curve.values())
    assert curve[STEPS] < curve[1]


def test_resume_after_kill_is_bitwise_exact(runs):
    _, ref, resumed, _ = runs
    assert "resuming from" in resumed.output and "step_00000004" in resumed.output
    a, b = losses(ref.metrics()), losses(resumed.metrics())
    assert list(b) == list(range(1, STEPS + 1))
    assert [a[s] for s in range(5, STEPS + 1)] == [b[s] for s in range(5, STEPS + 1)]
    final_a, final_b = _module_state(ref.run_dir, STEPS), _module_state(resumed.run_dir, STEPS)
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name


def test_one_rank_sees_the_same_samples_and_losses(runs):
    _, ref, _, one = runs

    def ids(result):
        return {r["step"]: r["debug/sample_ids"] for r in result.metrics()
                if "debug/sample_ids" in r}

    assert ids(one) == ids(ref) and sorted(ids(ref)) == list(range(1, STEPS + 1))
    a, b = losses(ref.metrics()), losses(one.metrics())
    for s in range(1, STEPS + 1):
        assert b[s] == pytest.approx(a[s], rel=1e-5), s


def test_fine_tuning_checkpoints_are_covered_by_their_manifest(runs, tmp_path):
    """What fine-tuning adds to a checkpoint (the loader's order with the store's examples
    description and template) is in files the manifest covers, and loads with
    ``weights_only=True``; a flipped byte in them is refused, naming the file."""
    task, ref, _, _ = runs
    p = subprocess.run([PYTHON, "-m", "zeroforge.launch", "verify", str(ref.run_dir)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() and all(line.startswith("OK ") for line in p.stdout.splitlines())
    info, _ = read_checkpoint(ref.run_dir, weights=False)
    assert (info.data_order.get("examples") or {}).get("format") == TASKS[task][1]
    tag = ref.run_dir / "checkpoints" / f"step_{STEPS:08d}"
    copy = tmp_path / "checkpoints" / tag.name
    shutil.copytree(tag, copy)
    states = copy / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    states.write_bytes(bytes(data))
    with pytest.raises(ckpt.CorruptCheckpointError, match="mp_rank_00_model_states.pt"):
        read_checkpoint(copy, weights=False)
