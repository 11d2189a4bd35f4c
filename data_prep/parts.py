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
from typing import Any

import numpy as np
import zarr

from .build import PrepError, config_hash
from .cache import CacheOptions
from .checksum import crc32_combine
from .locations import open_storage
from .storage import ObjectMissing, Storage, StorageError, join
from .store import LOSS_MASK, SPLITS, Layout, StoreError, TokenStore, create_split_arrays
from .writer import ArrayAppender, Claim

log = logging.getLogger(__name__)
_PART_RE = re.compile(r"part-(\d{5})-of-(\d{5})$")
PLAN_KEY = "_finalize.json"


def part_dir(store: str | os.PathLike[str], i: int, k: int) -> str:
    """Where part i of k is built: STORE/parts/part-0000i-of-0000k (a path or a URL)."""
    return join(os.fspath(store), "parts", f"part-{i:05d}-of-{k:05d}")


def _root_attrs(storage: Storage, key: str) -> dict[str, Any]:
    try:
        return json.loads(storage.read(key)).get("attributes", {})
    except ObjectMissing:
        return {}


def _load_parts(storage: Storage) -> list[tuple[str, dict[str, Any]]]:
    """(key prefix of the part, its root attributes) of every part, in order."""
    names = sorted({key.split("/")[1] for key in storage.list("parts/") if key.count("/") >= 2
                    and _PART_RE.match(key.split("/")[1])})
    if not names:
        raise PrepError(f"{storage.location}: no parts to finalize under {storage.url('parts')}")
    k = int(_PART_RE.match(names[0]).group(2))
    found = {int(_PART_RE.match(n).group(1)) for n in names}
    if any(int(_PART_RE.match(n).group(2)) != k for n in names) or found != set(range(k)):
        missing = sorted(set(range(k)) - found)
        raise PrepError(f"{storage.location}: parts do not form one complete set of {k} (missing: {missing or 'mixed counts'})")
    parts = []
    for name in names:
        prefix = f"parts/{name}"
        attrs = _root_attrs(storage, f"{prefix}/zarr.json")
        if not attrs.get("complete") or storage.exists(f"{prefix}/_build/ledger.json"):
            raise PrepError(f"{storage.url(prefix)}: this part has not finished building; rerun its prep command")
        parts.append((prefix, attrs))
    return parts


def _single_build_config(parts: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    configs = []
    for _d, attrs in parts:
        c = dict(attrs["prep_config"])
        c["part"] = None
        configs.append(c)
    if any(c != configs[0] for c in configs[1:]):
        raise PrepError("the parts were built with different settings; rebuild them with one command line")
    return configs[0]


def finalize(store: str | os.PathLike[str]) -> dict[str, Any]:
    """Stitch STORE/parts/* into STORE (a path or s3://). Safe to rerun after an interruption.

    The plan (`_finalize.json`) is a `Claim` like the build ledger: the finalize that wrote it
    last owns the store, and one that lost it stops at its next write of the plan. Its last
    write says `finished`; only then does the completion flag go in.
    """
    try:
        storage = open_storage(store)
    except StorageError as exc:
        raise PrepError(f"--finalize: {exc}") from None
    root = _root_attrs(storage, "zarr.json")
    if root.get("complete"):
        log.info("%s is already finalized: nothing to do", storage.location)
        return root
    claim = Claim(storage, PLAN_KEY, "finalize plan")
    if claim.exists():
        plan = claim.read()  # resumed: shards may already have moved
        claim.write(plan)
    else:
        plan = _plan(_load_parts(storage))
        group = zarr.open_group(storage.zarr_store(), mode="a", zarr_format=3)
        layout = Layout(**plan["attrs"]["layout"])
        has_mask = "examples" in plan["attrs"]
        for split in SPLITS:
            create_split_arrays(group, split, np.dtype(plan["attrs"]["dtype"]), layout,
                                loss_mask=has_mask)
            group[split]["tokens"].resize((plan["physical_len"][split],))
            if has_mask:
                group[split][LOSS_MASK].resize((plan["physical_len"][split],))
        claim.write(plan, create=True)

    group = zarr.open_group(storage.zarr_store(), mode="r+")
    attrs = plan["attrs"]
    if not plan.get("finished"):
        for src, dst in plan["moves"]:
            if storage.exists(src):
                storage.move(src, dst)
            elif not storage.exists(dst):
                raise PrepError(f"finalize: shard {storage.url(src)} is gone and {storage.url(dst)} does not exist")
        claim.write(plan)  # still ours: no other finalize took over while shards moved
        layout = Layout(**attrs["layout"])
        for split in SPLITS:
            arr = group[split]["doc_offsets"]
            arr.resize((0,))
            offsets = ArrayAppender(arr, layout.offsets_shard)
            offsets.append(np.zeros(1, dtype=np.int64))
            for part, base in zip(plan["parts"], plan["logical_start"][split], strict=True):
                offsets.append(_part_doc_offsets(storage, part, split)[1:] + base)
            offsets.finish()
            attrs["checksums"][split]["doc_offsets"] = f"{offsets.crc:08x}"
        attrs["complete"] = True
        plan["finished"] = True
        claim.write(plan)  # the point of no return
    group.attrs.update(attrs)
    storage.delete_prefix("parts/")
    storage.delete([PLAN_KEY])
    return attrs


def _part_doc_offsets(storage: Storage, part: str, split: str) -> np.ndarray:
    """A part's doc_offsets, read and checked like any store's (its tokens have moved)."""
    try:
        store = TokenStore.open(storage.url(part), check_shards=False, cache=CacheOptions(disk=False))
        return store.split(split).doc_offsets
    except StoreError as exc:
        raise PrepError(f"finalize: {exc}") from None


def _plan(parts: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
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
                        moves.append([f"{d}/{split}/{array}/c/{j}",
                                      f"{split}/{array}/c/{physical // shard + j}"])
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
        "parts": [d for d, _ in parts],
        "moves": moves,
        "logical_start": logical_start,
        "physical_len": physical_len,
        "attrs": attrs,
    }

