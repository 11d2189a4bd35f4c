"""Multi-part builds: part i of k is a complete store under STORE/parts/; `finalize` stitches them.

Stitching moves each part's token shard files into the final array (a rename, no copy). A part
does not end on a shard boundary, so part i+1 starts on the next one, and the split's `segments`
attribute maps the contiguous logical stream onto those physical ranges. doc_offsets (8 bytes a
document, not token data) are rewritten with each part's token offset added. Checksums combine
without reading tokens, and the prep configuration is a single build's, so the stitched store
has the same checksums, counts and configuration hash as a single build of the same inputs.
A fine-tuning store's loss mask is sharded like its tokens and moves the same way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import atomic
from .build import PrepError, config_hash
from .checksum import crc32_combine
from .store import LOSS_MASK, SPLITS, Layout, create_split_arrays
from .writer import ArrayAppender

log = logging.getLogger(__name__)
_PART_RE = re.compile(r"part-(\d{5})-of-(\d{5})$")


def part_dir(store: str | Path, i: int, k: int) -> Path:
    return Path(store) / "parts" / f"part-{i:05d}-of-{k:05d}"


def _load_parts(store: Path) -> list[tuple[Path, dict[str, Any]]]:
    root = store / "parts"
    dirs = sorted(d for d in root.iterdir() if _PART_RE.match(d.name)) if root.is_dir() else []
    if not dirs:
        raise PrepError(f"{store}: no parts to finalize under {root}")
    k = int(_PART_RE.match(dirs[0].name).group(2))
    found = {int(_PART_RE.match(d.name).group(1)) for d in dirs}
    if any(int(_PART_RE.match(d.name).group(2)) != k for d in dirs) or found != set(range(k)):
        missing = sorted(set(range(k)) - found)
        raise PrepError(f"{store}: parts do not form one complete set of {k} (missing: {missing or 'mixed counts'})")
    parts = []
    for d in dirs:
        meta = d / "zarr.json"
        attrs = json.loads(meta.read_text()).get("attributes", {}) if meta.is_file() else {}
        if not attrs.get("complete") or (d / "_build").exists():
            raise PrepError(f"{d}: this part has not finished building; rerun its prep command")
        parts.append((d, attrs))
    return parts


def _single_build_config(parts: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    configs = []
    for _d, attrs in parts:
        c = dict(attrs["prep_config"])
        c["part"] = None
        configs.append(c)
    if any(c != configs[0] for c in configs[1:]):
        raise PrepError("the parts were built with different settings; rebuild them with one command line")
    return configs[0]


def finalize(store: str | Path) -> dict[str, Any]:
    """Stitch STORE/parts/* into STORE. Safe to rerun after an interruption."""
    store = Path(store)
    root_meta = store / "zarr.json"
    if root_meta.is_file() and json.loads(root_meta.read_text()).get("attributes", {}).get("complete"):
        log.info("%s is already finalized: nothing to do", store)
        return json.loads(root_meta.read_text())["attributes"]
    plan_path = store / "_finalize.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())  # resumed: shards may already have moved
    else:
        plan = _plan(store, _load_parts(store))
        group = zarr.open_group(str(store), mode="a", zarr_format=3)
        layout = Layout(**plan["attrs"]["layout"])
        has_mask = "examples" in plan["attrs"]
        for split in SPLITS:
            create_split_arrays(group, split, np.dtype(plan["attrs"]["dtype"]), layout,
                                loss_mask=has_mask)
            group[split]["tokens"].resize((plan["physical_len"][split],))
            if has_mask:
                group[split][LOSS_MASK].resize((plan["physical_len"][split],))
        atomic.write_json(plan_path, plan)

    group = zarr.open_group(str(store), mode="r+")
    for src, dst in plan["moves"]:
        if os.path.exists(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        elif not os.path.exists(dst):
            raise PrepError(f"finalize: shard {src} is gone and {dst} does not exist")

    attrs = plan["attrs"]
    layout = Layout(**attrs["layout"])
    for split in SPLITS:
        arr = group[split]["doc_offsets"]
        arr.resize((0,))
        offsets = ArrayAppender(arr, layout.offsets_shard)
        offsets.append(np.zeros(1, dtype=np.int64))
        for part, base in zip(plan["parts"], plan["logical_start"][split], strict=True):
            part_offsets = np.asarray(zarr.open_array(os.path.join(part, split, "doc_offsets"), mode="r")[:])
            offsets.append(part_offsets[1:] + base)
        offsets.finish()
        attrs["checksums"][split]["doc_offsets"] = f"{offsets.crc:08x}"
    attrs["complete"] = True
    group.attrs.update(attrs)
    shutil.rmtree(store / "parts", ignore_errors=True)
    plan_path.unlink()
    return attrs


def _plan(store: Path, parts: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """Where every shard goes, and the stitched store's attributes (complete=False until done)."""
    config = _single_build_config(parts)
    first = parts[0][1]
    layout = Layout(**first["layout"])
    itemsize = np.dtype(first["dtype"]).itemsize
    shard = layout.shard_tokens
    moves: list[list[str]] = []
    segments: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
    logical_start: dict[str, list[int]] = {s: [] for s in SPLITS}
    physical_len: dict[str, int] = {}
    has_mask = "examples" in first
    arrays = ("tokens", LOSS_MASK) if has_mask else ("tokens",)
    counts: dict[str, dict[str, int]] = {s: {"docs": 0, "tokens": 0} for s in SPLITS}
    if has_mask:
        for s in SPLITS:
            counts[s]["loss_tokens"] = 0
    crcs = {s: 0 for s in SPLITS}
    mask_crcs = {s: 0 for s in SPLITS}
    skipped: dict[str, int] = {}
    text_bytes = 0
    for split in SPLITS:
        physical = 0
        for d, attrs in parts:
            n = int(attrs["counts"][split]["tokens"])
            logical_start[split].append(counts[split]["tokens"])
            if n:
                segments[split].append([counts[split]["tokens"], physical, n])
                for j in range(-(-n // shard)):
                    for array in arrays:
                        src = d / split / array / "c" / str(j)
                        moves.append([str(src), str(store / split / array / "c" / str(physical // shard + j))])
                physical += -(-n // shard) * shard
            part_crc = int(attrs["checksums"][split]["tokens"], 16)
            crcs[split] = crc32_combine(crcs[split], part_crc, n * itemsize)
            counts[split]["tokens"] += n
            counts[split]["docs"] += int(attrs["counts"][split]["docs"])
            if has_mask:
                part_mask_crc = int(attrs["checksums"][split][LOSS_MASK], 16)
                mask_crcs[split] = crc32_combine(mask_crcs[split], part_mask_crc, n)  # 1 byte each
                counts[split]["loss_tokens"] += int(attrs["counts"][split]["loss_tokens"])
        physical_len[split] = physical
    for _, attrs in parts:
        for reason, n in attrs["skipped"]["by_reason"].items():
            skipped[reason] = skipped.get(reason, 0) + n
        text_bytes += attrs["text_bytes"]
    attrs = dict(first)
    attrs.update(
        complete=False,
        sources=config["inputs"],
        prep_config=config,
        prep_config_hash=config_hash(config),
        counts=counts,
        segments=segments,
        checksums={s: {"tokens": f"{crcs[s]:08x}", "doc_offsets": None,
                       **({LOSS_MASK: f"{mask_crcs[s]:08x}"} if has_mask else {})} for s in SPLITS},
        skipped={"total": sum(skipped.values()), "by_reason": dict(sorted(skipped.items()))},
        text_bytes=text_bytes,
    )
    return {
        "parts": [str(d) for d, _ in parts],
        "moves": moves,
        "logical_start": logical_start,
        "physical_len": physical_len,
        "attrs": attrs,
    }

