"""Loss-curve PNG rendered from the run directory's `metrics.jsonl`.

The training loop appends one JSON object per line, each with an integer `step` and any metrics
logged at that step, e.g. `{"step": 100, "train/loss": 3.21, "train/lr": 6e-4}` and, at eval,
`{"step": 100, "val/loss": 3.35, "val/ppl": 28.5}`. Every key ending in `loss` becomes a series.

It is matplotlib, not MLflow, and works without any tracker (e.g. to plot a finished run
directory). Only matplotlib's object-oriented API (`Figure` + Agg canvas) is used: no pyplot, no
global backend switch, so it is safe in a headless process that may also hold other figures.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from zeroforge.pipeline.tracking.metrics_file import read_metrics

logger = logging.getLogger(__name__)


def loss_series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """`{metric name: (steps, values)}` for every key ending in `loss`, in step order.

    A resumed run rewrites steps it had logged before its last checkpoint; the later record wins so
    the curve shows what the continued run actually did.
    """
    by_key: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if not key.endswith("loss") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                by_key.setdefault(key, {})[record["step"]] = float(value)
    return {
        key: (sorted(points), [points[s] for s in sorted(points)])
        for key, points in sorted(by_key.items())
    }


def render_loss_curve(metrics_jsonl: Path, out_png: Path, step: int | None = None) -> bool:
    """Write a PNG of every loss series in `metrics_jsonl`; False (and no file) if none."""
    metrics_jsonl = Path(metrics_jsonl)
    if not metrics_jsonl.is_file():
        logger.debug("no loss curve: %s does not exist", metrics_jsonl)
        return False
    series = loss_series(read_metrics(metrics_jsonl))
    if not series:
        logger.debug("no loss curve: %s has no finite *loss values", metrics_jsonl)
        return False

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, (steps, values) in series.items():
        # Eval losses are sparse: markers keep a single eval point visible.
        sparse = len(steps) < 50
        ax.plot(steps, values, label=key, linewidth=1.2, marker="o" if sparse else None,
                markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("loss" if step is None else f"loss (step {step})")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return True
