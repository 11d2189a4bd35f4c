"""MLflow tracking through ``MlflowClient`` with explicit run ids.

Where runs go (first match wins): ``tracking.tracking_uri``, ``$MLFLOW_TRACKING_URI``, else an
embedded store inside the run directory (``<run_dir>/mlflow.db`` + ``<run_dir>/mlartifacts/``),
so a run is tracked with no server and ``mlflow ui --backend-store-uri
sqlite:///<run_dir>/mlflow.db`` shows it later.

Rules the code follows, and why:
- Only ``MlflowClient`` with explicit run ids, never the fluent ``mlflow.start_run`` stack:
  several trackers can live in one process (tests, evaluation next to training).
- After the run is open, tracking errors are logged as warnings and training goes on: losing a
  few metric points is better than losing a multi-day run to a tracking-server hiccup. Opening
  the run is different: a wrong URI fails at once with a message naming the setting.
- MLflow params are immutable. A resumed run logs only the params it has not logged yet and
  warns about (and keeps the first value of) any that changed.
- What the UI shows a new user: the experiment is tagged as model training
  (``mlflow.experimentKind``), else MLflow opens it in its GenAI view (traces, token usage);
  a run is named after its recipe and model plus its start time (unique in the experiment), its
  description (``mlflow.note.content``) says model, data, world size and command line, and its
  token stores are its dataset inputs.
"""

from __future__ import annotations

import os

# Read by mlflow when it is imported, so set before the import below. setdefault: an explicit
# user setting wins. Telemetry is off because training nodes are often offline and nothing here
# may wait on the network; MLflow logs INFO chatter otherwise.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

import contextlib  # noqa: E402
import getpass  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from mlflow.entities import (  # noqa: E402
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    Metric,
    Param,
    RunTag,
    ViewType,  # noqa: E402
)
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from zeroforge.pipeline.errors import ConfigError, RunError  # noqa: E402
from zeroforge.pipeline.tracking.base import Tracker, TrackingConfig, check_status  # noqa: E402
from zeroforge.pipeline.tracking.params import flatten  # noqa: E402
from zeroforge.pipeline.tracking.plots import render_loss_curve  # noqa: E402
from zeroforge.pipeline.tracking.summary import RunSummary, StoreInput  # noqa: E402

logger = logging.getLogger(__name__)
# The sqlite store's migrations (alembic) log INFO lines for every new store: same level.
with contextlib.suppress(ValueError):
    logging.getLogger("alembic").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())

# MLflow's limits. Tag values may be 8000 chars on recent servers; 5000 is what every MLflow
# 2.x server accepts, and the tracker may talk to an older server than the installed client.
MAX_KEY_LEN = 250
MAX_PARAM_VALUE_LEN = 6000
MAX_TAG_VALUE_LEN = 5000
LOSS_CURVE_DIR = "plots"  # artifact `plots/loss_curve.png`, overwritten at each eval
# The experiment tag that picks the UI's view; unset, MLflow 3 guesses its GenAI view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description in the UI
MAX_DIGEST_LEN = 36  # MLflow's limit on a dataset digest
# Characters MLflow accepts in param/metric/tag keys on every OS (colon is refused on Windows).
_BAD_KEY_CHARS = re.compile(r"[^\w./\- ]")


class MlflowTracker(Tracker):
    """Logs to one MLflow run through `MlflowClient`; build it with `make_tracker`."""

    def __init__(self, client: Any, tracking_uri: str, run_id: str, params: Mapping[str, str]):
        self._client = client
        self._uri = tracking_uri
        self.run_id = run_id
        self._params = dict(params)  # what the run already holds: MLflow refuses changes
        self._finished = False
        self._failures = 0
        self._monitor: Any = None

    @classmethod
    def start(
        cls,
        cfg: TrackingConfig,
        run_dir: Path,
        resume_run_id: str | None,
        tags: dict[str, str],
        summary: RunSummary | None = None,
    ) -> MlflowTracker:
        uri = resolve_tracking_uri(cfg, run_dir)
        _prepare_store(uri)  # a wrong URI fails in milliseconds, before MLflow's retries
        client = MlflowClient(tracking_uri=uri)
        run = _reopen_run(client, resume_run_id) if resume_run_id else None
        if run is None:
            experiment_id = _experiment_id(client, cfg.experiment, _artifact_root(uri))
            user = _user()
            start_tags = {"mlflow.user": user} if user else {}
            if resume_run_id:
                start_tags["zeroforge.resumed_from_run_id"] = resume_run_id
            name = cfg.run_name or (
                _unique_run_name(client, experiment_id, summary.name) if summary is not None
                else run_dir.resolve().name)
            run = client.create_run(experiment_id, run_name=name, tags=start_tags)
            resumed = False
        else:
            resumed = True
            previous = run.data.tags.get("zeroforge.resumes", "0")
            resumes = (int(previous) if previous.isdigit() else 0) + 1
            tags = {**tags, "zeroforge.resumes": str(resumes)}
        tracker = cls(client, uri, run.info.run_id, run.data.params if resumed else {})
        if summary is not None:
            # Again on resume: the world size (elastic resume) or the command may have changed.
            tags = {**tags, DESCRIPTION_TAG: summary.description}
            tracker.log_datasets(summary.datasets)
        tracker.set_tags(tags)
        if cfg.system_metrics:
            tracker._start_system_metrics(resumed)
        logger.info(
            "tracking: MLflow run %s (%s) at %s",
            tracker.run_id, "resumed" if resumed else "new", _redact(uri),
        )
        return tracker

    def log_params(self, params: Mapping[str, Any]) -> None:
        new, changed = [], []
        for key, value in _unique_keys(flatten(params)).items():
            value = _clip(value, MAX_PARAM_VALUE_LEN)
            old = self._params.get(key)
            if old is None:
                self._params[key] = value
                new.append(Param(key, value))
            elif old != value:
                changed.append(key)
        if changed:
            logger.warning(
                "tracking: %d param(s) differ from the values run %s already holds and keep "
                "their first value (MLflow params cannot change): %s",
                len(changed), self.run_id, ", ".join(changed[:20]),
            )
        if new:
            self._guard("log params", self._client.log_batch, self.run_id, params=new)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            if value is None:
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                self._warn(f"metric {key!r} is not a number ({value!r}); skipped")
                continue
            # MLflow stores +-inf as +-1.8e308; NaN is kept (a diverged loss should show).
            if math.isinf(number):
                number = math.copysign(1.7976931348623157e308, number)
            batch.append(Metric(_clean_key(key), number, timestamp, int(step)))
        if batch:
            self._guard("log metrics", self._client.log_batch, self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        log = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
        self._guard(f"log artifact {path}", log, self.run_id, str(path), artifact_path)

    def log_datasets(self, stores: tuple[StoreInput, ...]) -> None:
        """The token stores as the run's dataset inputs (MLflow keeps one per name and digest,
        so a resumed run logging them again adds nothing)."""
        inputs = [DatasetInput(
            Dataset(name=s.name, digest=_digest(s.digest), source_type="local" if
                    "://" not in s.source else s.source.split("://", 1)[0],
                    source=json.dumps({"uri": s.source}),
                    schema=json.dumps({"zeroforge": "token store", "fingerprint": s.digest}),
                    profile=json.dumps({**{f"{split}_{k}": v for split, c in s.splits.items()
                                           for k, v in c.items()}, "weight": s.weight})),
            tags=[InputTag("mlflow.data.context", "training"),
                  InputTag("weight", f"{s.weight:g}")]) for s in stores]
        if inputs:
            self._guard("log datasets", self._client.log_inputs, self.run_id, datasets=inputs)

    def register_model(self, export_dir: Path, name: str, step: int,
                       tags: Mapping[str, str]) -> str | None:
        """Log the exported model to this run and register it as a new version of ``name``;
        returns the version, None if tracking failed (warned)."""
        return self._guard(f"register model {name}", register_export, self._client, self.run_id,
                           export_dir, name, step, tags)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._guard(f"log {artifact_file}", self._client.log_text, self.run_id, text, artifact_file)

    def log_loss_curve(self, metrics_jsonl: Path, step: int) -> None:
        with tempfile.TemporaryDirectory(prefix="zeroforge-plot-") as tmp:
            png = Path(tmp) / "loss_curve.png"
            if self._guard("render loss curve", render_loss_curve, Path(metrics_jsonl), png, step):
                self._guard(
                    "log loss curve", self._client.log_artifact, self.run_id, str(png),
                    LOSS_CURVE_DIR,
                )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        batch = [
            RunTag(key, _clip(str(value), MAX_TAG_VALUE_LEN))
            for key, value in _unique_keys(tags).items()
        ]
        if batch:
            self._guard("set tags", self._client.log_batch, self.run_id, tags=batch)

    def finish(self, status: str = "FINISHED") -> None:
        check_status(status)
        if self._finished:
            return
        self._finished = True
        if self._monitor is not None:
            # Stop first: its last flush must reach the run while it is still RUNNING.
            self._guard("stop system metrics", self._monitor.finish)
            self._monitor = None
        self._guard("end run", self._client.set_terminated, self.run_id, status)
        logger.info("tracking: MLflow run %s ended %s", self.run_id, status)

    def _start_system_metrics(self, resumed: bool) -> None:
        if importlib.util.find_spec("psutil") is None:
            logger.warning(
                "tracking.system_metrics needs psutil (pip install psutil); system metrics off"
            )
            return
        # Sampling interval: $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL (default 10 s). On resume
        # its step counter continues after the last system metric step of the run.
        monitor = SystemMetricsMonitor(
            self.run_id, resume_logging=resumed, tracking_uri=self._uri
        )
        monitor.start()
        self._monitor = monitor

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- see the module docstring: training goes on
            self._warn(f"{what} failed ({type(exc).__name__}: {_first_line(exc)})")
            return None

    def _warn(self, message: str) -> None:
        # Warn for the first few failures, then every 100th, so an outage does not flood logs.
        self._failures += 1
        if self._failures <= 5 or self._failures % 100 == 0:
            logger.warning("tracking: %s [failure %d; training continues]", message, self._failures)


def resolve_tracking_uri(cfg: TrackingConfig, run_dir: Path) -> str:
    """`tracking.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else sqlite inside `run_dir`."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str((Path(run_dir) / "mlflow.db").resolve())


def register_export(client: Any, run_id: str, export_dir: Path, name: str, step: int,
                    tags: Mapping[str, str]) -> str:
    """A Hugging Face export directory as a logged model of run ``run_id`` (its artifacts, the
    run's "Logged models"), and a new version of registered model ``name`` made from it, both
    tagged with ``tags`` (step, store fingerprint, ...). Returns the version."""
    run = client.get_run(run_id)
    tags = {k: str(v) for k, v in tags.items()}
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                       tags=tags, model_type="transformers")
    client.log_model_artifacts(model.model_id, str(export_dir))
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # The artifact location, not models:/<id>: a sqlite registry resolves that URI through the
    # process-wide tracking URI instead of this client's, and would not find the model.
    version = client.create_model_version(name, source=model.artifact_location, run_id=run_id,
                                          tags=tags, model_id=model.model_id)
    return str(version.version)


def checkpoint_run_client(cfg: TrackingConfig, run_dir: Path, run_id: str | None) -> Any:
    """``zeroforge export --register``: a client of the tracking store of the run that wrote the
    checkpoint (its saved ``tracking`` settings and run directory), checked to hold the run."""
    if cfg.backend == "none" or run_id is None:
        raise ConfigError("--register: the checkpoint's run was not tracked (tracking.backend: "
                          "none), so there is no MLflow run to log the model to")
    uri = resolve_tracking_uri(cfg, run_dir)
    db = _sqlite_path(uri)
    if db is not None and not db.is_file():
        raise ConfigError(f"--register: the run's MLflow store {db} does not exist; set "
                          "MLFLOW_TRACKING_URI to the store the run logged to")
    _prepare_store(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        raise RunError(f"--register: MLflow run {run_id} of the checkpoint is not in "
                       f"{_redact(uri)} ({_first_line(exc)})") from None
    return client


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def _artifact_root(uri: str) -> str | None:
    """Artifacts next to a local sqlite store; MLflow's default would be ./mlruns in the cwd."""
    db = _sqlite_path(uri)
    return (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None


_SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every sqlite database file


def _prepare_store(uri: str) -> None:
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        if db.is_file() and db.stat().st_size:
            with open(db, "rb") as f:
                if f.read(len(_SQLITE_MAGIC)) != _SQLITE_MAGIC:
                    raise ConfigError(
                        f"tracking.tracking_uri / MLFLOW_TRACKING_URI: {db} is not an sqlite "
                        "database; point sqlite:/// at a new file or an MLflow database")
    elif uri.startswith(("http://", "https://")):
        _check_reachable(uri)


def _http_status(url: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _check_reachable(uri: str, timeout: float = 10.0) -> None:
    # Quick probes: MLflow's own client retries with backoff for minutes before giving up.
    # An auth proxy in front may answer 401/403: the server is there. A web server that is not
    # MLflow answers 404 to MLflow's own API as well (MLflow's client would dump its HTML page).
    base = uri.rstrip("/")
    try:
        if _http_status(base + "/health", timeout) in (200, 401, 403):
            return
        status = _http_status(base + "/api/2.0/mlflow/experiments/search?max_results=1", timeout)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"tracking.tracking_uri / MLFLOW_TRACKING_URI: cannot reach the MLflow server at "
            f"{_redact(uri)} ({reason}); start it, fix the URI, or set tracking.backend=none"
        ) from None
    if status not in (200, 401, 403):
        raise ConfigError(
            f"tracking.tracking_uri / MLFLOW_TRACKING_URI: {_redact(uri)} is not an MLflow "
            f"tracking server (HTTP {status} to MLflow's API); fix the URI, or set "
            "tracking.backend=none")


def _experiment_id(client: Any, name: str, artifact_root: str | None) -> str:
    """The experiment ``name`` (created when missing), tagged as model training unless its
    kind was already set (a user's choice wins)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root,
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        except MlflowException:
            # Another job created it between our lookup and create.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"tracking.experiment: MLflow experiment {name!r} is deleted; restore it "
            "(mlflow experiments restore) or choose another name"
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG,
                                  MODEL_TRAINING_KIND)
    return experiment.experiment_id


def _unique_run_name(client: Any, experiment_id: str, base: str) -> str:
    """``base · start time``, with `` (2)``, `` (3)``... if the experiment has that name."""
    # No quotes: MLflow's filter syntax has no escape for them.
    name = f"{base} · {time.strftime('%Y-%m-%d %H:%M:%S')}".replace("'", "")
    taken = {r.info.run_name for r in client.search_runs(
        [experiment_id], filter_string=f"attributes.run_name LIKE '{name}%'", max_results=1000,
        run_view_type=ViewType.ALL)}
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name} ({n})"
    return candidate


def _digest(fingerprint: str) -> str:
    """The fingerprint itself when MLflow can hold it (a two-split store's fits), else a hash of
    it (the schema keeps the full fingerprint)."""
    if len(fingerprint) <= MAX_DIGEST_LEN:
        return fingerprint
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:MAX_DIGEST_LEN]


def _reopen_run(client: Any, run_id: str) -> Any | None:
    """The run `run_id`, set back to RUNNING; None (with a warning) if it cannot continue."""
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        logger.warning(
            "tracking: cannot resume MLflow run %s (%s); starting a new run",
            run_id, _first_line(exc),
        )
        return None
    if run.info.lifecycle_stage == "deleted":
        logger.warning("tracking: MLflow run %s is deleted; starting a new run", run_id)
        return None
    # A KILLED/FAILED/FINISHED run can go back to RUNNING; metrics then continue its history.
    client.update_run(run_id, status="RUNNING")
    return client.get_run(run_id)


# ---------------------------------------------------------------------------------------- keys


def _clean_key(key: str) -> str:
    """A key MLflow accepts: allowed characters, no `..`/leading slash, at most 250 chars."""
    clean = _BAD_KEY_CHARS.sub("_", str(key))
    clean = re.sub(r"/+", "/", clean).strip("/")
    clean = "/".join(part if part not in (".", "..") else "_" for part in clean.split("/"))
    clean = clean or "_"
    if len(clean) > MAX_KEY_LEN:
        # Keep the readable start; the hash keeps two long keys with a common start distinct.
        clean = _with_digest(clean, clean)
    return clean


def _with_digest(clean: str, original: str) -> str:
    digest = hashlib.sha1(original.encode()).hexdigest()[:10]
    return f"{clean[:MAX_KEY_LEN - 11]}-{digest}"


def _unique_keys(items: Mapping[str, Any]) -> dict[str, Any]:
    """Keys cleaned for MLflow; two keys that clean to the same string stay apart."""
    out: dict[str, Any] = {}
    for key, value in items.items():
        clean = _clean_key(key)
        if clean in out:
            clean = _with_digest(clean, str(key))
        out[clean] = value
    return out


def _clip(value: str, limit: int) -> str:
    """`value` cut to `limit` chars, saying so; the full configs are logged as artifacts."""
    if len(value) <= limit:
        return value
    marker = f"...[cut, {len(value)} chars in all]"
    return value[: limit - len(marker)] + marker


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no passwd entry in some containers
        return None


def _redact(uri: str) -> str:
    return re.sub(r"//[^/@]+@", "//***@", uri)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
