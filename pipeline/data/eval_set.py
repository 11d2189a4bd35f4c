"""The fixed evaluation windows of a split, as batches: the same result on every call.

The list depends only on the data config and the stores: ``data.val_windows`` windows, split
over the stores in proportion to their weights and spread evenly over each store's split, with
span masks from a fixed seed (whatever ``train.seed`` is). It is cut to a multiple of the world
size so every rank runs the same number of forward passes (ZeRO-3 needs that), and rank r takes
entries r, r + world, ... . With ``val_windows`` a multiple of the world size the union over
ranks is the same list for any world size. ``sample_ids`` are positions in the list.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from zeroforge.pipeline.data.order import mixture_counts
from zeroforge.pipeline.data.windows import SplitWindows, open_stores
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.tasks.base import Task

log = logging.getLogger(__name__)

EVAL_SEED = 0  # masks and packing are the same for every run
EVAL_STREAM = 1  # and never coincide with training masks (loader.TRAIN_STREAM)


class NoEvalWindows(ConfigError):
    """The split is too small for even one evaluation window per rank (exit code 2); training
    goes on without evaluation instead (training/setup.py)."""


def _selection(ex: SplitWindows, split: str, total: int, quiet: bool) -> list[tuple[int, int]]:
    """(store, window) of the fixed list: weight-proportional, evenly spread per store."""
    chosen = []
    for j, (want, have) in enumerate(zip(mixture_counts(ex.weights, total), ex.counts,
                                         strict=True)):
        if want == 0:
            continue
        if have < 1:
            sp = ex.splits[j]
            raise NoEvalWindows(
                f"data.val_windows: store {ex.paths[j]} has no {split} {ex.task.unit_name} "
                f"for task {ex.task.name} (data.seq_len={ex.data.seq_len}; its {split} split: "
                f"{sp.n_docs} documents, {sp.n_tokens} tokens); rebuild it with a larger "
                "--val-fraction, or set data.val_windows: 0")
        if want > have and not quiet:
            log.warning("data.val_windows: store %s has only %d %s windows, using all",
                        ex.paths[j], have, split)
        want = min(want, have)
        # Evenly spaced rather than the first ones: covers the whole split.
        chosen += [(j, k * have // want) for k in range(want)]
    return chosen


def eval_batches(task: Task, batch_size: int, rank: int, world: int, split: str = "val"
                 ) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the fixed evaluation windows of ``split`` (see the module doc)."""
    if batch_size < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad eval layout: batch_size={batch_size}, rank={rank}, world={world}")
    if task.data.val_windows == 0:
        return []
    ex = SplitWindows(task.data, open_stores(task.data), split, task, EVAL_SEED)
    if rank == 0 and (dropped := ex.describe_dropped(split)) is not None:
        log.warning("evaluation: %s", dropped)
    chosen = _selection(ex, split, task.data.val_windows, quiet=rank != 0)
    usable = len(chosen) - len(chosen) % world
    if usable == 0:
        raise NoEvalWindows(f"data.val_windows: {len(chosen)} {split} windows, fewer than the "
                            f"{world} ranks that share them; rebuild the store with a larger "
                            "--val-fraction, or set data.val_windows: 0")
    mine = np.arange(rank, usable, world, dtype=np.int64)
    batches = []
    for a in range(0, len(mine), batch_size):
        pos = mine[a:a + batch_size]
        stores = np.asarray([chosen[p][0] for p in pos])
        windows = np.asarray([chosen[p][1] for p in pos])
        batches.append(task.batch(ex.windows(stores, windows), pos, EVAL_SEED, EVAL_STREAM))
    return batches
