"""Run config: shipped recipes parse, overrides, unknown keys / wrong types name the key, and the
DeepSpeed merge fills every "auto" from the run config."""

from __future__ import annotations

from pathlib import Path

import pytest
from zeroforge.pipeline.config import (
    SHIPPED as CONFIG_DIR,
)
from zeroforge.pipeline.config import (
    apply_overrides,
    build_run_config,
    load_run_config,
)
from zeroforge.pipeline.training.ds_config import Device

SHIPPED = sorted(Path(str(p)) for p in CONFIG_DIR.iterdir() if p.name.endswith(".yaml"))


def merge_ds_config(cfg, world_size: int, cpu: bool) -> dict:
    return cfg.ds_config(world_size, Device(cpu=cpu))
REQUIRED = {"gpt2-tiny-cpu", "gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b", "t5-tiny-cpu",
            "t5-base"}


def test_required_recipes_are_shipped():
    assert REQUIRED <= {p.stem for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_config_parses_and_merges(path: Path):
    cfg = load_run_config(str(path))
    cfg.build_model_config()  # the model section builds
    ds = merge_ds_config(cfg, world_size=8, cpu=False)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 8
    assert "auto" not in str(ds)
    assert "scheduler" not in ds


def test_overrides_and_required_keys():
    cfg = load_run_config("gpt2-tiny-cpu", ["train.max_steps=7", "train.seed=3",
                                            "checkpoint.every=2", "run_dir=/tmp/x",
                                            "tracking.backend=none", "data.store=/s",
                                            "model.n_layer=3", "optim.betas=[0.8, 0.9]"])
    assert (cfg.train.max_steps, cfg.train.seed, cfg.checkpoint.every) == (7, 3, 2)
    assert (cfg.run_dir, cfg.tracking.backend, cfg.data.store) == ("/tmp/x", "none", "/s")
    assert cfg.build_model_config().n_layer == 3 and cfg.optim.betas == [0.8, 0.9]


def test_unknown_keys_and_wrong_types_are_all_named():
    with pytest.raises(ValueError) as e:
        load_run_config("gpt2-tiny-cpu", ["train.max_stepz=3", "train.seed=abc",
                                          "optim.lr=fast", "model.n_layr=2", "bogus=1"])
    msg = str(e.value)
    assert "gpt2-tiny-cpu.yaml" in msg
    assert "train.max_stepz: unknown key (did you mean train.max_steps?)" in msg
    assert "train.seed: expected an integer, got str 'abc'" in msg
    assert "optim.lr: expected a number" in msg
    assert "model.n_layr: unknown key (did you mean model.n_layer?)" in msg
    assert "bogus: unknown key" in msg


def test_bad_values_are_collected():
    with pytest.raises(ValueError) as e:
        build_run_config({"data": {"store": "/s", "seq_len": 1}, "train": {"max_steps": 0},
                          "optim": {"schedule": "exp"}, "tracking": {"backend": "wandb"}})
    msg = str(e.value)
    for key in ("data.seq_len", "train.max_steps", "optim.schedule", "tracking.backend"):
        assert key in msg


def test_bool_is_not_an_int_and_int_is_a_float():
    with pytest.raises(ValueError, match="train.max_steps: expected an integer"):
        build_run_config({"data": {"store": "/s"}, "train": {"max_steps": True}})
    cfg = build_run_config({"data": {"store": "/s"}, "optim": {"lr": 1}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_apply_overrides_parses_yaml_scalars():
    out = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=true", "d.e=null", "f=x y"])
    assert out == {"a": {"b": 2, "c": True}, "d": {"e": None}, "f": "x y"}
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides({}, ["novalue"])


def test_deepspeed_overrides_merge_and_run_owned_keys_refused(tmp_path):
    cfg = load_run_config("gpt2-tiny-cpu", ["data.store=/s",
                                            "deepspeed.zero_optimization.stage=3",
                                            "deepspeed.zero_optimization.offload_optimizer.device=cpu"])
    ds = merge_ds_config(cfg, world_size=2, cpu=True)
    assert ds["zero_optimization"]["stage"] == 3
    # Offload: DeepSpeed's CPU Adam, not torch's.
    assert "torch_adam" not in ds["optimizer"]["params"]
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False

    bad = load_run_config("gpt2-tiny-cpu", ["data.store=/s", "deepspeed.gradient_clipping=2.0",
                                            "deepspeed.zero_optimisation.stage=2"])
    with pytest.raises(ValueError) as e:
        merge_ds_config(bad, world_size=1, cpu=True)
    assert "deepspeed.gradient_clipping: set optim.grad_clip" in str(e.value)
    assert "deepspeed.zero_optimisation.stage: unknown key" in str(e.value)

    own = tmp_path / "ds.json"
    own.write_text('{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}}')
    cfg = load_run_config("gpt2-tiny-cpu", ["data.store=/s", f"deepspeed_config={own}",
                                            "deepspeed={}"])
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu must be \"auto\""):
        merge_ds_config(cfg, world_size=1, cpu=True)


def test_adamw_is_torch_fused_on_gpu():
    cfg = load_run_config("gpt2-tiny-cpu", ["data.store=/s"])
    gpu = merge_ds_config(cfg, world_size=1, cpu=False)["optimizer"]
    assert gpu == {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                               "weight_decay": 0.1, "torch_adam": True,
                                               "fused": True}}
    cpu = merge_ds_config(cfg, world_size=1, cpu=True)["optimizer"]["params"]
    assert cpu["torch_adam"] is True and "fused" not in cpu
    offload = load_run_config("gpt2-tiny-cpu", [
        "data.store=/s", "deepspeed.zero_optimization.stage=2",
        "deepspeed.zero_optimization.offload_optimizer.device=cpu"])
    params = merge_ds_config(offload, world_size=1, cpu=False)["optimizer"]["params"]
    assert "torch_adam" not in params and "fused" not in params


def test_config_hash_is_stable_and_sensitive():
    a = load_run_config("gpt2-tiny-cpu", ["data.store=/s"])
    b = load_run_config("gpt2-tiny-cpu", ["data.store=/s"])
    c = load_run_config("gpt2-tiny-cpu", ["data.store=/s", "train.max_steps=51"])
    assert a.config_hash() == b.config_hash() != c.config_hash()


@pytest.mark.parametrize("override, key", [
    ("data.store=gs://bucket/store", "data.store"),
    ("data.store=s3://ab/store", "data.store"),
    ("run_dir=s3://bucket/runs/x", "run_dir"),
    ("checkpoint.dir=gs://bucket/ckpt", "checkpoint.dir"),
    ("init_from=hdfs://nn/run", "init_from"),
])
def test_urls_that_cannot_be_used_are_refused_naming_the_key(override, key):
    """A URL we do not handle is refused at config time, never turned into a local folder
    (Path("s3://b/x") is the directory s3:/b/x)."""
    from zeroforge.pipeline.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_run_config("gpt2-tiny-cpu", ["data.store=/s", override])
    assert f"{key}:" in str(err.value) and override.split("=", 1)[1] in str(err.value)


def test_a_mixture_of_s3_and_local_stores_is_accepted():
    cfg = load_run_config("gpt2-tiny-cpu", [
        "data.store=null",
        'data.mixture=[{"store": "s3://bucket/a", "weight": 1}, {"store": "/b", "weight": 2}]'])
    assert [p for p, _ in cfg.data.sources()] == ["s3://bucket/a", "/b"]
