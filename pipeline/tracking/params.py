"""What a run records about itself: params flattened to dotted keys, and the default tags
(zeroforge version, git commit of a source checkout, host names)."""

from __future__ import annotations

import importlib.metadata
import json
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

# A source checkout's root (editable install); in an installed wheel this holds no .git.
_REPO_ROOT = Path(__file__).resolve().parents[2]


def run_params(
    run_config: Mapping[str, Any],
    ds_config: Mapping[str, Any],
    *,
    world_size: int,
    n_params: int,
    store_fingerprint: str,
) -> dict[str, Any]:
    """The params a training run logs, under stable names: the run config at the top level
    (`train.max_steps`, ...), the merged DeepSpeed config under `deepspeed.`, and `run.*`."""
    return {
        **run_config,
        "deepspeed": dict(ds_config),
        "run": {
            "world_size": world_size,
            "n_params": n_params,
            "store_fingerprint": store_fingerprint,
        },
    }


def flatten(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested mappings (and config sections) to `{"a.b.c": "value"}` with string values.

    Strings stay as they are; other values are written as JSON (`true`, `null`, `0.0003`,
    `[1, 2]`) so they read like the YAML/JSON they came from. An empty mapping is kept as `{}`.
    """
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if isinstance(value, Mapping):
            out.update(flatten(value, name) if value else {name: "{}"})
        else:
            out[name] = _to_str(value)
    return out


def default_tags(hostnames: Sequence[str] | None = None) -> dict[str, str]:
    """Git commit (when zeroforge runs from a git checkout), host name(s), zeroforge version."""
    tags = {"zeroforge.version": zeroforge_version(), "zeroforge.hostname": socket.gethostname()}
    commit = git_commit(_REPO_ROOT)
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["zeroforge.git_commit"] = commit
        dirty = git_dirty(_REPO_ROOT)
        if dirty is not None:
            tags["zeroforge.git_dirty"] = "true" if dirty else "false"
    if hostnames:
        unique = list(dict.fromkeys(hostnames))  # rank order, each host once
        tags["zeroforge.hostnames"] = ",".join(unique)
        tags["zeroforge.num_hosts"] = str(len(unique))
    return tags


def zeroforge_version() -> str:
    try:
        return importlib.metadata.version("zeroforge")
    except importlib.metadata.PackageNotFoundError:  # a copy of the tree that was never installed
        return "unknown"


def git_commit(repo: Path) -> str | None:
    """HEAD of the git checkout rooted at `repo`; None without git, a checkout, or commits.

    Only `repo` itself counts: an installed zeroforge inside some other project's checkout
    must not report that project's commit.
    """
    if not (repo / ".git").exists():
        return None
    out = _git(repo, "rev-parse", "HEAD")
    return out.strip() if out else None


def git_dirty(repo: Path) -> bool | None:
    out = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out.strip())


def _git(repo: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    try:
        return json.dumps(value, default=str)
    except ValueError:  # circular structure
        return str(value)
