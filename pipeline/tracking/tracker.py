"""Which tracker a process holds (MLflow on rank 0, the no-op one elsewhere), and ending its run
with the right status. Building the no-op tracker never imports mlflow (~1.3 s)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.tracking.base import Tracker, TrackingConfig
from zeroforge.pipeline.tracking.params import default_tags
from zeroforge.pipeline.tracking.summary import RunSummary


@contextlib.contextmanager
def tracking_status(tracker: Tracker) -> Iterator[Tracker]:
    """End ``tracker``'s run with the right status however the block exits; re-raises.

    FINISHED on a normal exit, KILLED on ``KeyboardInterrupt``, FAILED on anything else. A loop
    that stops for preemption calls ``tracker.finish("KILLED")`` itself; ``finish`` is
    idempotent, so the FINISHED here is then ignored.
    """
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")


def make_tracker(
    cfg: TrackingConfig,
    run_dir: Path,
    rank: int,
    resume_run_id: str | None = None,
    hostnames: Sequence[str] | None = None,
    summary: RunSummary | None = None,
) -> Tracker:
    """The tracker for this process: MLflow on rank 0 unless ``tracking.backend`` is ``none``.

    ``resume_run_id`` (from the checkpoint) reopens that run, so its metrics continue; if the
    store no longer has it, a new run is started with a warning and tagged with the old id.
    ``hostnames`` (every rank's host, in rank order) are recorded as the ``zeroforge.hostnames``
    tag. ``summary`` names and describes a new run and lists its token stores as dataset inputs
    (pipeline/tracking/summary.py). Raises ConfigError naming the setting for a bad config or an
    unreachable server.
    """
    problems = cfg.problems()
    if problems:
        raise ConfigError("; ".join(problems))
    if cfg.backend == "none" or rank != 0:
        return Tracker()
    # Imported here, not at the top: mlflow costs ~1.3 s, which a run without tracking and
    # every rank but 0 should not pay.
    from zeroforge.pipeline.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker.start(cfg, Path(run_dir), resume_run_id, default_tags(hostnames),
                               summary)
