"""``metrics.jsonl`` in the run directory: one JSON object per logged step, appended by rank 0.

Each record has an integer ``step`` and the metrics logged at that step, e.g.
``{"step": 100, "train/loss": 3.21, "train/lr": 6e-4}``; a non-finite value is written as the
string ``"nan"`` / ``"inf"`` (JSON has neither). A process killed mid-write can leave a torn
last line: ``read_metrics`` skips it, and a resume rewrites the file without it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from zeroforge.data_prep import atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file (or of a run directory's), in file order.

    A line that is not a JSON object with an integer ``step`` is skipped: the last one may be
    torn by a kill; anywhere else it is reported too.
    """
    path = Path(path)
    if path.is_dir():
        path = metrics_path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif n != len(lines):
            log.warning("%s:%d: not a metrics record; skipped", path, n)
    return records


class MetricsWriter:
    """Appends one line per logged step. On resume it first rewrites the file without the lines
    past the resumed step: the run that died logged them, and the resumed run redoes them."""

    def __init__(self, run_dir: str | Path, resumed_step: int) -> None:
        self.path = metrics_path(run_dir)
        if self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resumed_step]
            atomic.write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
