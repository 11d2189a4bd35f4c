"""pipeline.tracking against a real `mlflow server` (session fixture) and the embedded sqlite store.

Everything is checked by reading it back through `MlflowClient`; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from zeroforge.pipeline.config import build_run_config
from zeroforge.pipeline.tracking.base import TrackingConfig
from zeroforge.pipeline.tracking.metrics_file import read_metrics as read_metrics_jsonl
from zeroforge.pipeline.tracking.mlflow_tracker import MAX_KEY_LEN, MAX_PARAM_VALUE_LEN
from zeroforge.pipeline.tracking.params import default_tags, flatten, git_commit, run_params
from zeroforge.pipeline.tracking.plots import loss_series, render_loss_curve
from zeroforge.pipeline.tracking.tracker import make_tracker, tracking_status

from tests.helpers.mlflow_server import free_port

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def server_cfg(server, **kw) -> TrackingConfig:
    # System metrics off unless a test is about them: their thread polls the server.
    return TrackingConfig(tracking_uri=server.uri, system_metrics=False, **kw)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def steps_of(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def write_metrics_jsonl(path: Path, n_steps: int, eval_every: int) -> None:
    lines = []
    for step in range(1, n_steps + 1):
        lines.append(json.dumps({"step": step, "train/loss": 10.0 / step, "train/lr": 1e-3}))
        if step % eval_every == 0:
            lines.append(json.dumps({"step": step, "val/loss": 11.0 / step, "val/ppl": 3.0}))
    # A line cut short by a killed writer must not break the plot.
    path.write_text("\n".join(lines) + '\n{"step": 99, "train/lo')


# ---------------------------------------------------------------------------------------------
# config, helpers, no-op tracker (no server)


def test_validate_names_each_bad_key():
    cfg = TrackingConfig(backend="wandb", experiment=" ", run_name="", tracking_uri="")
    problems = cfg.problems()
    assert problems[0] == "tracking.backend must be one of mlflow, none (got 'wandb')"
    for key in ("experiment", "run_name", "tracking_uri"):
        assert any(p.startswith(f"tracking.{key} ") for p in problems), key
    assert TrackingConfig().problems() == []
    with pytest.raises(ValueError, match="tracking.system_metrics: expected true/false, got str"):
        build_run_config({"data": {"store": "/s"}, "tracking": {"system_metrics": "yes"}})
    with pytest.raises(ValueError, match=r"tracking\.backend must be one of mlflow, none"):
        make_tracker(TrackingConfig(backend="wandb"), Path("unused"), rank=0)


def test_flatten_dotted_keys_and_json_values():
    from zeroforge.pipeline.section import Section

    class Sub(Section):
        lr: float = 3e-4
        betas: tuple = (0.9, 0.95)

    flat = flatten(
        {"train": {"max_steps": 10, "bf16": True, "note": None}, "optim": Sub(), "name": "x",
         "zero": {"offload": {}}, "path": Path("/a/b")}
    )
    assert flat == {
        "train.max_steps": "10", "train.bf16": "true", "train.note": "null",
        "optim.lr": "0.0003", "optim.betas": "[0.9, 0.95]", "name": "x",
        "zero.offload": "{}", "path": "/a/b",
    }
    params = run_params({"train": {"seed": 1}}, {"zero_optimization": {"stage": 2}},
                        world_size=2, n_params=1234, store_fingerprint="abc")
    assert flatten(params) == {
        "train.seed": "1", "deepspeed.zero_optimization.stage": "2", "run.world_size": "2",
        "run.n_params": "1234", "run.store_fingerprint": "abc",
    }


def test_default_tags_without_and_with_git(tmp_path):
    tags = default_tags(["node-a", "node-a", "node-b"])
    assert tags["zeroforge.hostnames"] == "node-a,node-b"
    assert tags["zeroforge.num_hosts"] == "2"
    assert tags["zeroforge.version"] not in ("", None)
    assert tags["zeroforge.hostname"]
    assert git_commit(tmp_path) is None  # not a checkout: no tag, no error

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    assert git_commit(tmp_path) is None  # a checkout without commits
    (tmp_path / "f").write_text("x")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "m")
    commit = git_commit(tmp_path)
    assert commit is not None and len(commit) == 40


def test_noop_tracker_creates_nothing_and_never_imports_mlflow(tmp_path):
    # A fresh interpreter: in this one other tests have imported mlflow already.
    code = f"""
import sys
from pathlib import Path
from zeroforge.pipeline.tracking.base import Tracker, TrackingConfig
from zeroforge.pipeline.tracking.tracker import make_tracker, tracking_status
run_dir = Path({str(tmp_path / "run")!r})
for tracker in (make_tracker(TrackingConfig(), run_dir, rank=1),
                make_tracker(TrackingConfig(backend="none"), run_dir, rank=0)):
    assert type(tracker) is Tracker and tracker.run_id is None
    with tracking_status(tracker):
        tracker.log_params({{"a": {{"b": 1}}}})
        tracker.log_metrics({{"train/loss": 1.0}}, step=1)
        tracker.log_text("x", "t.txt")
        tracker.log_artifact(run_dir / "missing")
        tracker.log_loss_curve(run_dir / "metrics.jsonl", step=1)
        tracker.set_tags({{"k": "v"}})
assert not run_dir.exists()
assert "mlflow" not in sys.modules and "matplotlib" not in sys.modules, sorted(sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
    assert list(tmp_path.iterdir()) == []


def test_loss_curve_rendering(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics_jsonl(metrics, n_steps=20, eval_every=5)
    records = read_metrics_jsonl(metrics)
    assert len(records) == 24  # the cut line is skipped
    series = loss_series(records)
    assert sorted(series) == ["train/loss", "val/loss"]
    assert series["val/loss"][0] == [5, 10, 15, 20]
    out = tmp_path / "curve.png"
    assert render_loss_curve(metrics, out, step=20)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert not render_loss_curve(tmp_path / "missing.jsonl", tmp_path / "no.png")
    (tmp_path / "empty.jsonl").write_text('{"step": 1, "train/lr": 0.1}\n')
    assert not render_loss_curve(tmp_path / "empty.jsonl", tmp_path / "no.png")
    assert not (tmp_path / "no.png").exists()


def test_unreachable_server_fails_fast_naming_the_setting(tmp_path):
    cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ValueError, match=r"tracking\.tracking_uri / MLFLOW_TRACKING_URI"):
        make_tracker(cfg, tmp_path / "run", rank=0)


# ---------------------------------------------------------------------------------------------
# real server


def test_params_metrics_tags_artifacts_land(mlflow_server, tmp_path):
    run_dir = tmp_path / "run"
    tracker = make_tracker(
        server_cfg(mlflow_server, experiment="land", run_name="r1"), run_dir, rank=0,
        hostnames=["h0", "h0", "h1"],
    )
    assert tracker.run_id
    long_key = "k" * 300
    tracker.log_params({
        "train": {"max_steps": 10, "seed": 7},
        "deepspeed": {"zero_optimization": {"stage": 2}},
        "run": {"world_size": 2},
        "long": "v" * 7000,
        long_key: 1,
        "bad key(%)": "x",
    })
    for step in (1, 2, 3):
        tracker.log_metrics(
            {"train/loss": 4.0 - step, "train/lr": 1e-3 * step, "train/tokens_per_s": 1e5,
             "train/skipped_steps": 0, "ignored": None},
            step=step,
        )
    tracker.log_metrics({"val/loss": float("nan"), "val/ppl": float("inf")}, step=3)
    config = run_dir / "config.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    config.write_text("train:\n  max_steps: 10\n")
    tracker.log_artifact(config, "config")
    tracker.log_text(json.dumps([{"prompt": "a", "text": "b"}]), "samples/step_000003.json")
    tracker.set_tags({"purpose": "test"})
    tracker.finish()

    client = client_for(mlflow_server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r1"
    assert client.get_experiment(run.info.experiment_id).name == "land"
    params = run.data.params
    assert params["train.max_steps"] == "10"
    assert params["deepspeed.zero_optimization.stage"] == "2"
    assert params["run.world_size"] == "2"
    assert len(params["long"]) == MAX_PARAM_VALUE_LEN and params["long"].endswith("in all]")
    assert [k for k in params if k.startswith("kkk")] == [
        next(k for k in params if k.startswith("kkk"))
    ]
    assert all(len(k) <= MAX_KEY_LEN for k in params)
    assert params["bad key___"] == "x"
    assert steps_of(client, tracker.run_id, "train/loss") == [1, 2, 3]
    assert run.data.metrics["train/loss"] == 1.0
    assert "ignored" not in run.data.metrics
    val = client.get_metric_history(tracker.run_id, "val/loss")[0]
    assert val.step == 3 and val.value != val.value  # NaN kept: a diverged loss should show
    assert run.data.metrics["val/ppl"] > 1e300
    tags = run.data.tags
    assert tags["purpose"] == "test"
    assert tags["zeroforge.hostnames"] == "h0,h1"
    assert "zeroforge.version" in tags and "zeroforge.hostname" in tags
    local = Path(client.download_artifacts(tracker.run_id, "", str(tmp_path / "dl")))
    assert (local / "config" / "config.yaml").read_text() == config.read_text()
    assert json.loads((local / "samples" / "step_000003.json").read_text())[0]["text"] == "b"


@pytest.mark.parametrize(
    ("exc", "status"),
    [(None, "FINISHED"), (ValueError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")],
)
def test_tracking_status_sets_run_status(mlflow_server, tmp_path, exc, status):
    tracker = make_tracker(server_cfg(mlflow_server, experiment="status"), tmp_path, rank=0)
    if exc is None:
        with tracking_status(tracker):
            tracker.log_metrics({"train/loss": 1.0}, step=1)
    else:
        with pytest.raises(type(exc)), tracking_status(tracker):
            raise exc
    tracker.finish("FINISHED")  # idempotent: the first status stays
    assert client_for(mlflow_server.uri).get_run(tracker.run_id).info.status == status


def test_resume_continues_same_run_with_continuous_steps(mlflow_server, tmp_path):
    cfg = server_cfg(mlflow_server, experiment="resume")
    client = client_for(mlflow_server.uri)
    first = make_tracker(cfg, tmp_path, rank=0)
    with pytest.raises(KeyboardInterrupt), tracking_status(first):
        first.log_params({"train": {"max_steps": 5, "seed": 1}})
        for step in range(1, 6):
            first.log_metrics({"train/loss": 1.0 / step}, step=step)
        raise KeyboardInterrupt  # stopped on request after saving a checkpoint
    assert client.get_run(first.run_id).info.status == "KILLED"

    second = make_tracker(cfg, tmp_path, rank=0, resume_run_id=first.run_id)
    assert second.run_id == first.run_id
    assert client.get_run(second.run_id).info.status == "RUNNING"
    with tracking_status(second):
        # Same, changed and new params: no crash, the changed one keeps its first value.
        second.log_params({"train": {"max_steps": 10, "seed": 1}, "extra": "new"})
        for step in range(6, 11):
            second.log_metrics({"train/loss": 1.0 / step}, step=step)

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.max_steps": "5", "train.seed": "1", "extra": "new"}
    assert run.data.tags["zeroforge.resumes"] == "1"
    assert steps_of(client, first.run_id, "train/loss") == list(range(1, 11))
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id]


def test_resume_of_unknown_run_starts_a_new_tagged_run(mlflow_server, tmp_path):
    missing = "0" * 32
    tracker = make_tracker(server_cfg(mlflow_server), tmp_path, rank=0, resume_run_id=missing)
    tracker.finish()
    run = client_for(mlflow_server.uri).get_run(tracker.run_id)
    assert tracker.run_id != missing
    assert run.data.tags["zeroforge.resumed_from_run_id"] == missing


def test_loss_curve_artifact_is_refreshed_png(mlflow_server, tmp_path):
    tracker = make_tracker(server_cfg(mlflow_server), tmp_path, rank=0)
    metrics = tmp_path / "metrics.jsonl"
    write_metrics_jsonl(metrics, n_steps=10, eval_every=5)
    tracker.log_loss_curve(metrics, step=10)
    write_metrics_jsonl(metrics, n_steps=20, eval_every=5)
    tracker.log_loss_curve(metrics, step=20)
    tracker.finish()
    client = client_for(mlflow_server.uri)
    listed = [a.path for a in client.list_artifacts(tracker.run_id, "plots")]
    assert listed == ["plots/loss_curve.png"]
    png = Path(client.download_artifacts(tracker.run_id, "plots/loss_curve.png", str(tmp_path)))
    assert png.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    assert matplotlib.image.imread(png).ndim == 3  # decodes as an image


def test_system_metrics_are_logged(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cfg = TrackingConfig(tracking_uri=mlflow_server.uri, system_metrics=True)
    tracker = make_tracker(cfg, tmp_path, rank=0)
    client = client_for(mlflow_server.uri)
    deadline = time.monotonic() + 60  # a wait for the sampler thread, not a timing assertion
    while time.monotonic() < deadline:
        if any(k.startswith("system/") for k in client.get_run(tracker.run_id).data.metrics):
            break
        time.sleep(0.2)
    tracker.finish()
    metrics = client.get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------
# embedded store (no server, no MLFLOW_TRACKING_URI)


def test_embedded_sqlite_store_lives_in_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd_mlruns = Path("mlruns").exists()  # MLflow's default artifact root must stay unused
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(system_metrics=False)
    tracker = make_tracker(cfg, run_dir, rank=0)
    tracker.log_params({"train": {"max_steps": 3}})
    tracker.log_metrics({"train/loss": 2.0}, step=1)
    tracker.log_text("hello", "samples/step_000001.txt")
    tracker.finish("KILLED")

    resumed = make_tracker(cfg, run_dir, rank=0, resume_run_id=tracker.run_id)
    resumed.log_metrics({"train/loss": 1.0}, step=2)
    resumed.finish()

    assert (run_dir / "mlflow.db").is_file()
    texts = list((run_dir / "mlartifacts").rglob("step_000001.txt"))
    assert [p.read_text() for p in texts] == ["hello"]
    assert not (tmp_path / "mlruns").exists() and Path("mlruns").exists() == cwd_mlruns
    client = client_for(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    assert steps_of(client, tracker.run_id, "train/loss") == [1, 2]


# ---------------------------------------------------------------------------------------------
# what the UI shows a new user: experiment kind, run name, description, dataset inputs


def _summary(tmp_path):
    from zeroforge.data_prep.build import PrepOptions, build_store
    from zeroforge.data_prep.store import TokenStore
    from zeroforge.pipeline.tracking.summary import run_summary

    paths = []
    for name, frac in (("pydoc-a", 0.1), ("pydoc-b", 0.2)):
        build_store(["builtin:pydoc-topics"], tmp_path / name,
                    PrepOptions(val_fraction=frac, progress=False))
        paths.append(str(tmp_path / name))
    stores = [TokenStore.open(p) for p in paths]
    summary = run_summary(recipe="gpt2-tiny-cpu", family="gpt2", preset="gpt2-tiny", task="gpt",
                          n_params=3_418_112, sources=[(paths[0], 3.0), (paths[1], 1.0)],
                          stores=stores, world_size=2, zero_stage=1, precision="fp32",
                          device="cpu", command="zeroforge train --config gpt2-tiny-cpu")
    return summary, stores


def test_new_user_sees_kind_name_description_and_datasets(mlflow_server, tmp_path):
    from zeroforge.pipeline.tracking.mlflow_tracker import DESCRIPTION_TAG, EXPERIMENT_KIND_TAG

    summary, stores = _summary(tmp_path)
    assert summary.name == "gpt2-tiny-cpu · gpt2 3.4M"
    cfg = server_cfg(mlflow_server, experiment="ui-view")
    first = make_tracker(cfg, tmp_path, rank=0, summary=summary)
    second = make_tracker(cfg, tmp_path, rank=0, summary=summary)  # same second, most likely
    client = client_for(mlflow_server.uri)
    experiment = client.get_experiment_by_name("ui-view")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    runs = [client.get_run(t.run_id) for t in (first, second)]
    names = [r.info.run_name for r in runs]
    assert all(n.startswith("gpt2-tiny-cpu · gpt2 3.4M · ") for n in names)
    assert names[0] != names[1]
    note = runs[0].data.tags[DESCRIPTION_TAG]
    assert "**gpt2 gpt2-tiny**, 3.4M parameters" in note and "world size** 2" in note
    assert "`zeroforge train --config gpt2-tiny-cpu`" in note and str(tmp_path / "pydoc-a") in note
    inputs = {d.dataset.name: d for d in runs[0].inputs.dataset_inputs}
    assert sorted(inputs) == ["pydoc-a", "pydoc-b"]
    for store, (name, weight) in zip(stores, (("pydoc-a", "3"), ("pydoc-b", "1")), strict=True):
        d = inputs[name]
        assert d.dataset.digest == store.fingerprint
        assert json.loads(d.dataset.source)["uri"] == str(Path(store.path).resolve())
        profile = json.loads(d.dataset.profile)
        counts = store.attrs["counts"]
        assert profile["train_tokens"] == counts["train"]["tokens"]
        assert profile["val_documents"] == counts["val"]["docs"] and profile["weight"] == float(weight)
        assert {t.key: t.value for t in d.tags} == {"mlflow.data.context": "training",
                                                  "weight": weight}
    for t in (first, second):
        t.finish()
    # An experiment whose kind a user chose keeps it.
    client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    make_tracker(cfg, tmp_path, rank=0, summary=summary).finish()
    assert client.get_experiment(experiment.experiment_id).tags[EXPERIMENT_KIND_TAG] == \
        "genai_development"
    # A resumed run keeps its name and logs its datasets once.
    resumed = make_tracker(cfg, tmp_path, rank=0, resume_run_id=first.run_id, summary=summary)
    again = client.get_run(resumed.run_id)
    assert again.info.run_name == names[0] and len(again.inputs.dataset_inputs) == 2
    resumed.finish()


def test_existing_experiment_gets_the_training_kind(mlflow_server, tmp_path):
    from zeroforge.pipeline.tracking.mlflow_tracker import EXPERIMENT_KIND_TAG

    client = client_for(mlflow_server.uri)
    client.create_experiment("made-before")  # by an older zeroforge, or by hand
    make_tracker(server_cfg(mlflow_server, experiment="made-before"), tmp_path, rank=0).finish()
    assert client.get_experiment_by_name("made-before").tags[EXPERIMENT_KIND_TAG] == \
        "custom_model_development"


def test_register_export_in_the_embedded_sqlite_store(tmp_path, monkeypatch):
    # The embedded store (the default) resolves a registered model's source itself: a
    # models:/ URI would be looked up in the process-wide tracking store and not be found.
    from zeroforge.pipeline.tracking.mlflow_tracker import register_export

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = make_tracker(TrackingConfig(system_metrics=False), tmp_path, rank=0)
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").write_text("{}")
    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tags = {"zeroforge.step": "3", "zeroforge.store_fingerprint": "abc-1-2"}
    assert register_export(client, tracker.run_id, export, "tiny", 3, tags) == "1"
    assert register_export(client, tracker.run_id, export, "tiny", 3, tags) == "2"
    version = client.get_model_version("tiny", "2")
    assert version.run_id == tracker.run_id and version.tags == tags
    outputs = client.get_run(tracker.run_id).outputs.model_outputs
    assert len(outputs) == 2 and {o.step for o in outputs} == {3}
    tracker.finish()
