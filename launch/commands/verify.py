"""`zeroforge verify PATH`: exit 0 when every checksum and invariant holds, 1 naming each fault.

PATH is a token store, local or s3:// (every chunk's CRC-32C, the split checksums, document
boundaries), or a run directory, a checkpoint directory or one checkpoint tag (every committed
checkpoint's files against its manifest: sizes and CRC-32C).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zeroforge.data_prep.verify import verify_store
from zeroforge.launch.commands import stdout_to_stderr


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH",
                   help="token store (a directory or s3://BUCKET/PREFIX), run directory, "
                        "checkpoint directory or checkpoint tag")


def _checkpoints(path: Path) -> tuple[list[str], list[str]]:
    """(problems, OK lines) of the committed checkpoints ``path`` names."""
    with stdout_to_stderr():  # torch, only for checkpoints: a store's check does not need it
        from zeroforge.pipeline.training import checkpoint as ckpt

    if ckpt.step_of_tag(path.name) is not None:
        root, tags = path.parent, [path.name]
        if not (path / ckpt.MARKER).is_file():
            return [f"{path}: not committed (no {ckpt.MARKER} marker: an interrupted save, "
                    "which resume ignores)"], []
    else:
        root = next((r for r in (path, ckpt.root_of_run(path)) if ckpt.committed(r)), None)
        if root is None:
            return [f"{path}: not a token store (no zarr.json), and no committed checkpoint in "
                    f"it or in {ckpt.root_of_run(path)}"], []
        tags = [t for _, t in ckpt.committed(root)]
    problems, ok = [], []
    for tag in tags:
        found = ckpt.verify_tag(root / tag)
        problems += found
        if not found:
            ok.append(f"OK {root / tag}")
    return problems, ok


def run(args) -> int:
    path = Path(args.path)
    if "://" in args.path or (path / "zarr.json").is_file() or not path.is_dir():
        problems, ok = verify_store(args.path), [f"OK {args.path}"]
    else:
        problems, ok = _checkpoints(path)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if problems:
        return 1
    print("\n".join(ok))
    return 0
