"""A tracked 2-rank ZeRO-3 run as an MLflow user sees it, read back from a real MLflow server
through its REST API and client: the experiment opens in the model-training view, the run is
named after recipe and model and described, its two token stores (a mixture) are its dataset
inputs with their weights, lm-evaluation-harness scores (all ranks sharing the documents) are
its `harness/<task>/<metric>` metrics, and the model it ends with is registered; `zeroforge
export --register` adds a second version from the same run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import urllib.parse
import urllib.request

import pytest
from zeroforge.data_prep.build import PrepOptions, build_store
from zeroforge.data_prep.store import TokenStore

from tests.e2e.conftest import PYTHON, REPO, launch, tiny_overrides
from tests.helpers.harness_tasks import GEN, MC, write_tasks

STEPS, EVERY, LIMIT = 8, 4, 8
EXPERIMENT, MODEL = "e2e-ui", "zf-e2e-tiny"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _rest(server, path: str, **query: str) -> dict:
    url = f"{server.uri}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def tracked(tiny_store, tmp_path_factory, mlflow_server):
    """The run: a 3:1 mixture of two stores, ZeRO-3, harness every 4 steps, registration."""
    other = tmp_path_factory.mktemp("store-b") / "store"
    build_store(["builtin:pydoc-topics"], other, PrepOptions(val_fraction=0.2, progress=False))
    tasks = write_tasks(tmp_path_factory.mktemp("ui-tasks"))
    run_dir = tmp_path_factory.mktemp("ui-run")
    overrides = tiny_overrides(tiny_store, run_dir, **{
        "data.store": "null",
        "data.mixture": f"[{{store: {tiny_store}, weight: 3}}, {{store: {other}, weight: 1}}]",
        "deepspeed.zero_optimization.stage": 3, "train.max_steps": STEPS,
        "checkpoint.every": 0, "tracking.backend": "mlflow", "tracking.experiment": EXPERIMENT,
        "tracking.system_metrics": "false", "tracking.register_model": MODEL,
        "eval.harness_tasks": f"[{MC}, {GEN}]", "eval.harness_every": EVERY,
        "eval.harness_limit": LIMIT, "eval.harness_include_path": str(tasks),
        "eval.harness_batch_size": 4})
    result = launch(run_dir, overrides, nproc=2, env={**mlflow_server.env, **OFFLINE})
    assert result.returncode == 0, result.output[-5000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    return result, client, run, [TokenStore.open(tiny_store), TokenStore.open(other)], tasks


def test_experiment_opens_in_the_training_view(tracked, mlflow_server):
    got = _rest(mlflow_server, "experiments/get-by-name", experiment_name=EXPERIMENT)
    tags = {t["key"]: t["value"] for t in got["experiment"]["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_run_name_and_description(tracked):
    _, _, run, _, _ = tracked
    assert run.info.run_name.startswith("gpt2-tiny-cpu · gpt2 ")
    note = run.data.tags["mlflow.note.content"]
    assert "**gpt2 gpt2-tiny**" in note and "task `gpt`" in note
    assert "**world size** 2 (ZeRO stage 3, fp32, cpu)" in note
    assert "zeroforge train --config" in note and "eval.harness_every=4" in note
    assert note.count("**data** (weight") == 2


def test_token_stores_are_dataset_inputs(tracked):
    _, _, run, stores, _ = tracked
    inputs = sorted(run.inputs.dataset_inputs, key=lambda d: -float(json.loads(
        d.dataset.profile)["weight"]))
    assert [d.dataset.digest for d in inputs] == [s.fingerprint for s in stores]
    assert [json.loads(d.dataset.profile)["weight"] for d in inputs] == [3.0, 1.0]
    for d, store in zip(inputs, stores, strict=True):
        profile = json.loads(d.dataset.profile)
        assert profile["train_tokens"] == store.attrs["counts"]["train"]["tokens"]
        assert profile["train_documents"] == store.attrs["counts"]["train"]["docs"]
        assert d.dataset.name == "store"


def test_harness_metrics_during_training(tracked):
    result, client, run, _, tasks = tracked
    history = client.get_metric_history(run.info.run_id, f"harness/{MC}/acc")
    assert [m.step for m in history] == [EVERY, STEPS]
    assert [m.step for m in client.get_metric_history(
        run.info.run_id, f"harness/{GEN}/exact_match")] == [EVERY, STEPS]
    logged = [r for r in result.metrics() if f"harness/{MC}/acc" in r]
    assert [r["step"] for r in logged] == [EVERY, STEPS]
    # The ranks shared the documents of a ZeRO-3 model gathered for the evaluation: the same
    # score as the final checkpoint's, evaluated in one process.
    p = subprocess.run([PYTHON, "-m", "zeroforge.launch", "eval", "--checkpoint",
                        str(result.run_dir), "--tasks", MC, "--include-path", str(tasks),
                        "--limit", str(LIMIT), "--json"], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**os.environ, **OFFLINE})
    assert p.returncode == 0, p.stderr[-3000:]
    alone = json.loads(p.stdout)["results"][MC]
    assert math.isclose(history[-1].value, alone["acc,none"], abs_tol=1e-9)
    assert math.isclose(logged[-1][f"harness/{MC}/acc_norm"], alone["acc_norm,none"],
                        abs_tol=1e-9)


def test_final_model_registered_and_export_registers_another(tracked, mlflow_server, tmp_path):
    result, client, run, stores, _ = tracked
    fingerprint = "+".join(s.fingerprint for s in stores)
    (v1,) = client.search_model_versions(f"name='{MODEL}'")
    assert v1.version == "1" and v1.run_id == run.info.run_id
    assert v1.tags["zeroforge.step"] == str(STEPS)
    assert v1.tags["zeroforge.store_fingerprint"] == fingerprint
    # The run's "Logged models": its output, made from the export.
    (output,) = client.get_run(run.info.run_id).outputs.model_outputs
    assert output.step == STEPS
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == run.info.run_id and logged.name == MODEL
    assert v1.source == logged.artifact_location
    files = {f.path for f in client.list_logged_model_artifacts(logged.model_id)}
    assert {"config.json", "model.safetensors", "vocab.json"} <= files
    assert (result.run_dir / "export" / "config.json").is_file()

    out = tmp_path / "hf"
    p = subprocess.run([PYTHON, "-m", "zeroforge.launch", "export", "--checkpoint",
                        str(result.run_dir), "--out", str(out), "--register", MODEL], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, **mlflow_server.env})
    assert p.returncode == 0, p.stderr[-3000:]
    versions = {v.version: v for v in client.search_model_versions(f"name='{MODEL}'")}
    assert sorted(versions) == ["1", "2"]
    v2 = versions["2"]
    assert v2.run_id == run.info.run_id and v2.tags["zeroforge.step"] == str(STEPS)
    assert v2.tags["zeroforge.store_fingerprint"] == fingerprint
    models = client.search_logged_models([run.info.experiment_id])
    assert sorted(m.artifact_location for m in models) == sorted([v1.source, v2.source])
    assert all(m.source_run_id == run.info.run_id for m in models)
    # REST: the registry knows the model by name.
    got = _rest(mlflow_server, "registered-models/get", name=MODEL)
    assert got["registered_model"]["name"] == MODEL


def test_export_register_refuses_an_untracked_run(tracked, tiny_store, tmp_path):
    untracked = tmp_path / "untracked"
    result = launch(untracked, tiny_overrides(tiny_store, untracked, **{
        "train.max_steps": 2, "checkpoint.every": 0, "data.val_windows": 0}), nproc=1)
    assert result.returncode == 0, result.output[-3000:]
    p = subprocess.run([PYTHON, "-m", "zeroforge.launch", "export", "--checkpoint",
                        str(untracked), "--out", str(tmp_path / "x"), "--register", MODEL],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith(
        "zeroforge export: error: --register: the checkpoint's run was not tracked")
    assert not (tmp_path / "x").exists()  # refused before anything was exported
