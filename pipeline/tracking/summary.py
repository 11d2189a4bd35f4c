"""What a tracked run says about itself on its MLflow page: a readable name (recipe and model),
a short description (model and size, data, world size, command line), and its token stores as
dataset inputs. Built by rank 0 at setup; mlflow is not imported here."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zeroforge.data_prep.store import TokenStore


@dataclass(frozen=True)
class StoreInput:
    """One token store of the run, as an MLflow dataset input."""

    name: str  # the store directory's name
    digest: str  # the store's fingerprint
    source: str  # where it is (absolute path or URL)
    weight: float  # its mixture weight (1 for a single store)
    splits: dict[str, dict[str, int]]  # {"train": {"documents": n, "tokens": n}, ...}


@dataclass(frozen=True)
class RunSummary:
    name: str  # readable start of the run name; the tracker adds the start time
    description: str  # Markdown: the run's description (MLflow tag mlflow.note.content)
    datasets: tuple[StoreInput, ...] = field(default_factory=tuple)


def format_params(n: int) -> str:
    """124439808 -> "124M", 1557611200 -> "1.6B", 3418112 -> "3.4M"."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            value = n / div
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.1f}{unit}".replace(".0", "")
    return str(n)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command this rank runs, as the user would type it (launcher-added flags dropped)."""
    args = [a for a in (sys.argv[1:] if argv is None else argv)
            if not a.startswith(("--local_rank", "--local-rank"))]
    return shlex.join(["zeroforge", *args])


def store_inputs(sources: Sequence[tuple[str, float]], stores: Sequence[TokenStore]
                 ) -> tuple[StoreInput, ...]:
    out = []
    for (path, weight), store in zip(sources, stores, strict=True):
        source = path if "://" in path else str(Path(path).resolve())
        counts = store.attrs["counts"]
        splits = {s: {"documents": int(c["docs"]), "tokens": int(c["tokens"])}
                  for s, c in counts.items()}
        out.append(StoreInput(Path(path.rstrip("/")).name or path, store.fingerprint, source,
                              float(weight), splits))
    return tuple(out)


def run_summary(*, recipe: str | None, family: str, preset: str | None, task: str,
                n_params: int, sources: Sequence[tuple[str, float]],
                stores: Sequence[TokenStore], world_size: int, zero_stage: int, precision: str,
                device: str, command: str) -> RunSummary:
    size = format_params(n_params)
    inputs = store_inputs(sources, stores)
    model = f"{family} {preset}" if preset and preset != family else family
    lines = [f"**{model}**, {size} parameters ({n_params:,}), task `{task}`"
             + (f", recipe `{recipe}`" if recipe else ""), ""]
    for s in inputs:
        share = f" (weight {s.weight:g})" if len(inputs) > 1 else ""
        counts = "; ".join(f"{split} {c['tokens']:,} tokens in {c['documents']:,} documents"
                           for split, c in s.splits.items())
        lines += [f"**data**{share}: `{s.source}`: {counts}", ""]
    lines += [f"**world size** {world_size} (ZeRO stage {zero_stage}, {precision}, {device})", "",
              f"**command**: `{command}`"]
    name = f"{recipe or family} · {family} {size}"
    return RunSummary(name, "\n".join(lines), inputs)
