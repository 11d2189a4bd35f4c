"""The tracker interface and its settings. The base class is the no-op tracker: the training
loop always holds a tracker and never asks whether tracking is on (other ranks, or
``tracking.backend: none``); ``MlflowTracker`` (mlflow_tracker.py) overrides it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from zeroforge.pipeline.section import Section

BACKENDS = ("mlflow", "none")
STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrackingConfig(Section):
    """Experiment tracking (YAML key ``tracking``)."""

    KEY: ClassVar[str] = "tracking"

    backend: str = "mlflow"  # "mlflow" | "none"
    experiment: str = "zeroforge"  # MLflow experiment name, created when missing
    run_name: str | None = None  # None: the run directory's name
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite in run_dir
    system_metrics: bool = True  # CPU/RAM/disk/network (GPU with nvidia-ml-py) via psutil
    # At the end of training, export the final checkpoint (<run_dir>/export), log it to the run
    # and register it as a new version of this Model Registry name; null: no registration.
    register_model: str | None = None

    def problems(self) -> list[str]:
        p = []
        if self.backend not in BACKENDS:
            p.append(f"tracking.backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        if not self.experiment.strip():
            p.append("tracking.experiment must be a non-empty string")
        elif len(self.experiment) > 500:
            p.append("tracking.experiment must be at most 500 characters")
        if self.run_name is not None and not self.run_name.strip():
            p.append("tracking.run_name must be a non-empty string or null")
        if self.tracking_uri is not None and not self.tracking_uri.strip():
            p.append("tracking.tracking_uri must be a non-empty string or null")
        if self.register_model is not None and not self.register_model.strip():
            p.append("tracking.register_model must be a model name or null")
        if self.register_model and self.backend == "none":
            p.append("tracking.register_model needs tracking.backend: mlflow")
        return p


class Tracker:
    """The no-op tracker, and the interface every tracker implements."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; nested mappings are flattened to dotted keys (see ``params.flatten``)."""

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        """Log numeric metrics at a training step; ``None`` values are skipped."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (or a directory's contents) under ``artifact_path``."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as the artifact ``artifact_file`` (e.g. ``samples/step_000100.json``)."""

    def log_loss_curve(self, metrics_jsonl: Path, step: int) -> None:
        """Render the loss curve of ``metrics_jsonl`` to ``plots/loss_curve.png``, replacing it."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags (overwriting tags of the same name)."""

    def register_model(self, export_dir: Path, name: str, step: int,
                       tags: Mapping[str, str]) -> str | None:
        """Log an exported model to the run and register a new version of ``name``; returns
        the version (None: nothing registered)."""
        return None

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED; calls after the first do nothing."""
        check_status(status)


def check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"tracker status must be one of {', '.join(STATUSES)} (got {status!r})")
