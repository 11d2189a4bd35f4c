"""Training and validation batches from token stores, in a deterministic, resumable global order.

The whole design hangs on one idea: the global sample order is a pure function of
``(seed, sample index)``, so the loader state is just "how many global samples were consumed"
and a resume with a different number of ranks continues the same order. See
docs/data-loading.md for the layout of windows, the permutation, mixtures and span corruption.

Vocabulary used below:
    window      fixed-length slice of a split's token stream (GPT: seq_len+1 tokens with stride
                seq_len; T5: raw_len tokens with stride raw_len)
    G           global batch = micro_batch * grad_accum * world samples per optimizer step
    sample g    position g in the global order (epoch included): the sample_ids of the batches
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.span_corruption import corrupt, example_rng, n_spans, t5_lengths

__all__ = ["DataConfig", "GlobalOrder", "TrainLoader", "t5_lengths", "val_batches"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
TASKS = ("gpt", "t5")
_TRAIN_STREAM = 0  # span-corruption RNG streams, so train and val masks never coincide
_VAL_STREAM = 1
_VAL_SEED = 0  # val windows and masks are fixed for every run, whatever train.seed is
_FEISTEL_ROUNDS = 6
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass
class DataConfig:
    """Where the tokens come from and how examples are cut (YAML key ``data``)."""

    store: str | None = None  # token store path (single store)
    mixture: list[dict] = field(default_factory=list)  # [{"store": path, "weight": w}, ...]
    seq_len: int = 256  # GPT context length / T5 encoder input length
    noise_density: float = 0.15  # T5 span corruption: fraction of raw tokens masked
    mean_span_length: float = 3.0  # T5 span corruption: mean noise span length
    prefetch: int = 4  # micro-batches prepared ahead by the background thread
    val_windows: int = 64  # fixed validation windows (at most; capped by the val split)

    def validate(self) -> list[str]:
        """Every problem as a "data.xxx must ..." string; empty when the config is usable."""
        problems = []
        if (self.store is None) == (not self.mixture):
            problems.append("data.store or data.mixture must be set (exactly one of them)")
        for i, entry in enumerate(self.mixture):
            key = f"data.mixture[{i}]"
            if not isinstance(entry, dict):
                problems.append(f"{key} must be a mapping with keys store and weight")
                continue
            unknown = sorted(set(entry) - {"store", "weight"})
            if unknown:
                problems.append(f"{key} must only have keys store, weight (got {unknown})")
            if not isinstance(entry.get("store"), str) or not entry.get("store"):
                problems.append(f"{key}.store must be a token store path")
            weight = entry.get("weight")
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not (math.isfinite(weight) and weight > 0)
            ):
                problems.append(f"{key}.weight must be a positive number, got {weight!r}")
        if self.seq_len < 2:
            problems.append(f"data.seq_len must be at least 2, got {self.seq_len}")
        if not 0.0 < self.noise_density < 1.0:
            problems.append(f"data.noise_density must be in (0, 1), got {self.noise_density}")
        if not self.mean_span_length >= 1.0:
            problems.append(f"data.mean_span_length must be >= 1, got {self.mean_span_length}")
        if self.prefetch < 1:
            problems.append(f"data.prefetch must be at least 1, got {self.prefetch}")
        if self.val_windows < 0:
            problems.append(f"data.val_windows must be >= 0, got {self.val_windows}")
        return problems

    def sources(self) -> list[tuple[str, float]]:
        """(store path, weight) for every store; a single store has weight 1."""
        if self.store is not None:
            return [(self.store, 1.0)]
        return [(str(e["store"]), float(e["weight"])) for e in self.mixture]


def mixture_counts(weights: Sequence[float], total: int) -> list[int]:
    """Largest-remainder rounding of ``total * w_j / sum(w)``; sums to ``total`` exactly.

    Exact rational arithmetic, so the counts never depend on float summation order. Ties in
    the remainder go to the earlier store.
    """
    fracs = [Fraction(w) for w in weights]
    quotas = [total * f / sum(fracs) for f in fracs]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda j: (-(quotas[j] - counts[j]), j))
    for j in by_remainder[: total - sum(counts)]:
        counts[j] += 1
    return counts


class FeistelPermutation:
    """A keyed pseudo-random bijection of [0, n), computed pointwise in O(1) memory.

    A balanced Feistel network permutes [0, 4^h) for the smallest 4^h >= n; values that land
    outside [0, n) are encrypted again (cycle walking), which keeps the map a bijection of
    [0, n) and costs fewer than 4 rounds-trips on average. A materialised permutation of 1e9
    windows would take 8 GB per epoch; this takes nothing.
    """

    def __init__(self, n: int, key: Sequence[int]):
        assert n >= 1
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.n = n
        self.keys = [np.uint64(k) for k in key]

    def _round_fn(self, r: np.ndarray, k: np.uint64) -> np.ndarray:
        # splitmix64 finaliser: a cheap, well-mixed 64-bit hash (uint64 array ops wrap mod 2^64)
        x = r + k
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))) & self.mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for k in self.keys:
            left, right = right, left ^ self._round_fn(right, k)
        return (left << np.uint64(self.half)) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        x = self._encrypt(np.asarray(index, dtype=np.uint64))
        outside = x >= np.uint64(self.n)
        while outside.any():
            x[outside] = self._encrypt(x[outside])
            outside = x >= np.uint64(self.n)
        return x.astype(np.int64)


class GlobalOrder:
    """Maps global sample index -> (store, window): a pure function of the seed and the index.

    Global batch b (samples ``[b*G, (b+1)*G)``) takes ``counts[j]`` samples from store j, namely
    samples ``[b*counts[j], (b+1)*counts[j])`` of that store's own stream; store sample s is
    window ``perm_{seed, j, s // n_j}(s % n_j)`` (each store wraps its epochs independently).
    Inside a batch the stores are spread evenly by a fixed pattern, so every micro-batch and
    every rank sees roughly the mixture proportions. With one store this reduces to
    "sample g is window perm_{seed, epoch}(g % n) with epoch = g // n", whatever G is.
    """

    def __init__(self, windows_per_epoch: Sequence[int], counts: Sequence[int], seed: int):
        assert len(windows_per_epoch) == len(counts) and all(n > 0 for n in windows_per_epoch)
        self.windows_per_epoch = [int(n) for n in windows_per_epoch]
        self.counts = [int(c) for c in counts]
        self.global_batch = sum(self.counts)
        self.seed = seed
        # Smooth weighted round-robin: the q-th sample of store j sits at key (q + 0.5) / c_j.
        keys = [
            (Fraction(2 * q + 1, 2 * c), j, q) for j, c in enumerate(self.counts) for q in range(c)
        ]
        keys.sort()
        self._pattern_store = np.array([j for _, j, _ in keys], dtype=np.int64)
        self._pattern_q = np.array([q for _, _, q in keys], dtype=np.int64)
        self._perms: dict[tuple[int, int], FeistelPermutation] = {}

    def _perm(self, store: int, epoch: int) -> FeistelPermutation:
        perm = self._perms.get((store, epoch))
        if perm is None:  # building one is cheap; the cache only saves the key derivation
            if len(self._perms) > 64:  # epochs only move forward; keep the cache small
                self._perms = {}
            seq = np.random.SeedSequence([self.seed & 0xFFFFFFFFFFFFFFFF, store, epoch])
            key = seq.generate_state(_FEISTEL_ROUNDS, dtype=np.uint64)
            perm = FeistelPermutation(self.windows_per_epoch[store], key)
            self._perms[(store, epoch)] = perm
        return perm

    def store_samples(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(store index, sample index within that store's stream) of global samples ``g``."""
        g = np.asarray(g, dtype=np.int64)
        if len(self.counts) == 1:
            return np.zeros_like(g), g
        batch, pos = np.divmod(g, self.global_batch)
        store = self._pattern_store[pos]
        counts = np.asarray(self.counts, dtype=np.int64)
        return store, batch * counts[store] + self._pattern_q[pos]

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(store index, store epoch, window index) of global samples ``g``."""
        store, s = self.store_samples(g)
        n = np.asarray(self.windows_per_epoch, dtype=np.int64)[store]
        epoch, i = np.divmod(s, n)
        window = np.empty_like(i)
        for j, e in set(zip(store.tolist(), epoch.tolist(), strict=True)):
            sel = (store == j) & (epoch == e)
            window[sel] = self._perm(j, e)(i[sel])
        return store, epoch, window

    def store_epochs(self, samples: int) -> list[int]:
        """Epoch each store's stream is in after ``samples`` global samples (a batch boundary)."""
        if len(self.counts) == 1:
            return [samples // self.windows_per_epoch[0]]
        batches = samples // self.global_batch
        return [batches * c // n for c, n in zip(self.counts, self.windows_per_epoch, strict=True)]


# ----------------------------------------------------------------------------- examples


class _Examples:
    """Opened stores of one split plus the task's window geometry; builds batches."""

    def __init__(self, cfg: DataConfig, task: str, split: str, sentinel_ids, pad_id):
        from data_prep.store import TokenStore  # heavy (zarr); only needed once data is read

        problems = list(cfg.validate())
        if task not in TASKS:
            problems.append(f"task must be one of {TASKS}, got {task!r}")
        if problems:
            raise ValueError("; ".join(problems))
        self.task, self.cfg = task, cfg
        self.paths = [p for p, _ in cfg.sources()]
        self.weights = [w for _, w in cfg.sources()]
        key = "data.store" if cfg.store is not None else "data.mixture"
        for i, path in enumerate(self.paths):
            if "://" not in path and not Path(path).exists():
                where = key if cfg.store is not None else f"{key}[{i}].store"
                raise ValueError(f"{where}: no token store at {path}")
        self.stores = [TokenStore.open(p) for p in self.paths]
        tok = {(s.tokenizer, s.vocab_size, s.eot_id) for s in self.stores}
        if len(tok) > 1:
            raise ValueError(f"data.mixture: stores use different tokenizers {sorted(tok)}")
        self.eot_id = self.stores[0].eot_id
        for i, s in enumerate(self.stores):
            if split not in s.splits:
                raise ValueError(f"{key}: store {self.paths[i]} has no {split!r} split")
        self.splits = [s.split(split) for s in self.stores]
        if task == "gpt":
            self.enc_len, self.dec_len = cfg.seq_len, 0
            self.stride, self.read_len = cfg.seq_len, cfg.seq_len + 1
        else:
            self.enc_len = cfg.seq_len
            raw_len, self.dec_len = t5_lengths(cfg.seq_len, cfg.noise_density, cfg.mean_span_length)
            self.stride = self.read_len = raw_len
            needed = n_spans(raw_len, cfg.noise_density, cfg.mean_span_length)
            if sentinel_ids is None or pad_id is None:
                raise ValueError("task t5 needs the model's sentinel_ids and pad_id")
            if len(sentinel_ids) < needed:
                raise ValueError(
                    f"data.seq_len={cfg.seq_len} with data.noise_density={cfg.noise_density} "
                    f"and data.mean_span_length={cfg.mean_span_length} makes {needed} noise spans "
                    f"per example, but the model has only {len(sentinel_ids)} sentinels"
                )
        self.sentinel_ids = None if sentinel_ids is None else [int(x) for x in sentinel_ids]
        self.pad_id = pad_id
        # GPT windows overlap by one token (stride seq_len), so every token but the first is a
        # target exactly once per epoch: floor((n_tokens - 1) / seq_len) windows.
        self.windows = [
            (sp.n_tokens - (self.read_len - self.stride)) // self.stride for sp in self.splits
        ]

    def window_tokens(self, store: int, window: int) -> np.ndarray:
        start = window * self.stride
        return self.splits[store].tokens(start, start + self.read_len)

    def batch(self, store, window, sample_ids, mask_seed: int, mask_stream: int) -> dict:
        """One batch of CPU int64 tensors; span-corruption masks keyed by the sample id."""
        raws = [self.window_tokens(int(j), int(w)) for j, w in zip(store, window, strict=True)]
        ids = torch.from_numpy(np.asarray(sample_ids, dtype=np.int64))
        if self.task == "gpt":
            x = torch.from_numpy(np.stack(raws).astype(np.int64))  # (B, T+1)
            return {
                "input_ids": x[:, :-1].contiguous(),
                "targets": x[:, 1:].contiguous(),
                "sample_ids": ids,
            }
        inputs, labels = [], []
        for raw, g in zip(raws, sample_ids, strict=True):
            rng = example_rng(mask_seed, mask_stream, int(g))
            enc, dec = corrupt(
                raw,
                self.cfg.noise_density,
                self.cfg.mean_span_length,
                self.sentinel_ids,
                self.eot_id,
                rng,
            )
            assert len(enc) == self.enc_len and len(dec) == self.dec_len
            inputs.append(enc)
            labels.append(dec)
        y = torch.from_numpy(np.stack(labels))  # (B, T_dec)
        # Teacher forcing: decoder sees the labels shifted right behind the start token (= pad).
        dec_in = torch.cat([torch.full_like(y[:, :1], self.pad_id), y[:, :-1]], dim=1)
        return {
            "input_ids": torch.from_numpy(np.stack(inputs)),
            "decoder_input_ids": dec_in,
            "labels": y,
            "sample_ids": ids,
        }


# ----------------------------------------------------------------------------- training


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class TrainLoader:
    """Micro-batches of the train split for one rank, prefetched by a background thread.

    Global step k consumes global samples ``[start + k*G, start + (k+1)*G)``; its micro-batch m
    goes to all ranks as a block of ``micro_batch * world`` samples, rank r taking the r-th
    slice of ``micro_batch``. Changing world and grad_accum with G fixed therefore only
    regroups the same samples. Iteration never ends: epochs wrap.
    """

    def __init__(
        self,
        cfg: DataConfig,
        task: str,
        micro_batch: int,
        grad_accum: int,
        rank: int,
        world: int,
        seed: int,
        sentinel_ids: Sequence[int] | None = None,
        pad_id: int | None = None,
        state: dict | None = None,
    ):
        if micro_batch < 1 or grad_accum < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(
                f"bad batch layout: micro_batch={micro_batch}, grad_accum={grad_accum}, "
                f"rank={rank}, world={world}"
            )
        self.examples = _Examples(cfg, task, "train", sentinel_ids, pad_id)
        self.cfg, self.task, self.seed = cfg, task, seed
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.rank, self.world = rank, world
        self.global_batch = micro_batch * grad_accum * world
        ex = self.examples
        for i, n in enumerate(ex.windows):
            if n < 1:
                raise ValueError(
                    f"data.seq_len={cfg.seq_len}: store {ex.paths[i]} has only "
                    f"{ex.splits[i].n_tokens} train tokens, less than one window of {ex.read_len}"
                )
        counts = mixture_counts(ex.weights, self.global_batch)
        if 0 in counts:
            raise ValueError(
                f"data.mixture[{counts.index(0)}].weight is too small: it gets 0 of the "
                f"{self.global_batch} samples of each global batch; raise it or the batch size"
            )
        self.order = GlobalOrder(ex.windows, counts, seed)
        self._start = 0  # global samples consumed before this iteration began
        self._yielded = 0  # micro-batches handed to the caller since _start
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.prefetch)
        self._stop = threading.Event()
        if state is not None:
            self.load_state_dict(state)
        if rank == 0:
            log.info(
                "data: %s over %s, %s windows per epoch, %d samples per global step (%s)",
                task,
                ex.paths,
                ex.windows,
                self.global_batch,
                counts,
            )

    # -- geometry ---------------------------------------------------------------------------

    @property
    def tokens_per_global_step(self) -> int:
        """Tokens fed to the model per optimizer step (GPT: inputs; T5: encoder + decoder)."""
        return self.global_batch * (self.examples.enc_len + self.examples.dec_len)

    def locate(self, sample_ids) -> tuple[np.ndarray, np.ndarray]:
        """(store index, window index) of global samples, e.g. a batch's ``sample_ids``."""
        store, _, window = self.order.locate(np.asarray(sample_ids, dtype=np.int64))
        return store, window

    def _micro_ids(self, step: int, micro: int) -> np.ndarray:
        base = self._start + step * self.global_batch + micro * self.micro_batch * self.world
        return base + self.rank * self.micro_batch + np.arange(self.micro_batch, dtype=np.int64)

    def _make(self, step: int, micro: int) -> dict:
        g = self._micro_ids(step, micro)
        store, _, window = self.order.locate(g)
        return self.examples.batch(store, window, g, self.seed, _TRAIN_STREAM)

    # -- state ------------------------------------------------------------------------------

    def _order_identity(self) -> dict[str, Any]:
        """What must not change across a resume, because it changes the global order."""
        ex = self.examples
        ident: dict[str, Any] = {
            "task": self.task,
            "seq_len": self.cfg.seq_len,
            "seed": self.seed,
            "stores": [s.fingerprint for s in ex.stores],
            "weights": ex.weights,
        }
        if self.task == "t5":
            ident["noise"] = [self.cfg.noise_density, self.cfg.mean_span_length]
        return ident

    def state_dict(self) -> dict:
        """Position at the last global step completely handed out (call at a step boundary)."""
        samples = self._start + (self._yielded // self.grad_accum) * self.global_batch
        epochs = self.order.store_epochs(samples)
        return {
            "version": STATE_VERSION,
            "epoch": min(epochs),
            "samples": samples,
            "store_epochs": epochs,
            "global_batch": self.global_batch,
            "order": self._order_identity(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state["samples"]`` global samples; refuses a different order."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data loader state version {state.get('version')!r} is not {STATE_VERSION}"
            )
        mine, theirs = self._order_identity(), state.get("order", {})
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if changed:
            detail = ", ".join(
                f"{k}: saved {theirs.get(k)!r}, now {mine.get(k)!r}" for k in changed
            )
            raise ValueError(f"data loader state is from a different data order ({detail})")
        samples = state["samples"]
        if not isinstance(samples, int) or samples < 0:
            raise ValueError(f"data loader state has bad samples={samples!r}")
        # A mixture's per-store positions are defined per global batch, so G must stay.
        if len(self.examples.stores) > 1 and state.get("global_batch") != self.global_batch:
            raise ValueError(
                f"global batch changed from {state.get('global_batch')} to {self.global_batch}: "
                "a data mixture resumes only with the same micro_batch * grad_accum * world"
            )
        if len(self.examples.stores) > 1 and samples % self.global_batch:
            raise ValueError(
                f"data loader state samples={samples} is not at a global batch boundary"
            )
        if state.get("epoch") != min(self.order.store_epochs(samples)):
            raise ValueError(f"data loader state is inconsistent: {state}")
        self.close()
        self._start, self._yielded = samples, 0

    # -- iteration --------------------------------------------------------------------------

    def _produce(self, start_step: int, stop: threading.Event, out: queue.Queue) -> None:
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for step in itertools.count(start_step):
                for micro in range(self.grad_accum):
                    if not put(self._make(step, micro)):
                        return
        except BaseException as exc:  # handed to the consumer, who re-raises it
            put(_Failure(exc))

    def _start_thread(self) -> None:
        assert self._yielded % self.grad_accum == 0, "prefetch restarts only at a step boundary"
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.cfg.prefetch)
        self._thread = threading.Thread(
            target=self._produce,
            args=(self._yielded // self.grad_accum, self._stop, self._queue),
            name=f"zeroforge-data-rank{self.rank}",
            daemon=True,  # never keeps a crashed process alive
        )
        self._thread.start()

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict:
        if self._thread is None:
            self._start_thread()
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise RuntimeError("data prefetch thread failed") from item.exc
        self._yielded += 1
        return item

    def close(self) -> None:
        """Stop and join the prefetch thread; iterating again restarts it where it stopped."""
        if self._thread is None:
            return
        self._stop.set()
        while True:  # unblock a producer stuck in put()
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()
        self._thread = None
        if self._yielded % self.grad_accum:
            # Mid-step: restart from the last step boundary and replay its micro-batches, so the
            # producer never has to start inside a step.
            self._yielded -= self._yielded % self.grad_accum
            log.debug("data loader closed mid-step; it will resume at the step boundary")

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- validation


def _val_selection(ex: _Examples, total: int, quiet: bool) -> list[tuple[int, int]]:
    """(store, window) of the fixed val list: weight-proportional, evenly spread per store."""
    if total == 0:
        return []
    chosen = []
    for j, (want, have) in enumerate(
        zip(mixture_counts(ex.weights, total), ex.windows, strict=True)
    ):
        if want == 0:
            continue
        if have < 1:
            raise ValueError(
                f"data.val_windows: store {ex.paths[j]} has no val window of {ex.read_len} "
                "tokens; rebuild it with --val-fraction > 0, or set data.val_windows: 0"
            )
        if want > have and not quiet:
            log.warning(
                "data.val_windows: store %s has only %d val windows, using all", ex.paths[j], have
            )
        want = min(want, have)
        # Evenly spaced rather than the first ones: covers the whole val split.
        chosen += [(j, k * have // want) for k in range(want)]
    return chosen


def val_batches(
    cfg: DataConfig,
    task: str,
    batch_size: int,
    rank: int,
    world: int,
    sentinel_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
) -> list[dict]:
    """This rank's share of the fixed validation windows, as batches (same result every call).

    The val list depends only on the config and the stores. It is cut to a multiple of
    ``world`` so every rank runs the same number of forward passes (ZeRO-3 needs that), and
    rank r takes entries r, r + world, ... . With val_windows a multiple of world the union
    over ranks is the same list for any world size. ``sample_ids`` are positions in the list.
    """
    if batch_size < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad val layout: batch_size={batch_size}, rank={rank}, world={world}")
    if cfg.val_windows == 0:
        return []
    ex = _Examples(cfg, task, "val", sentinel_ids, pad_id)
    chosen = _val_selection(ex, cfg.val_windows, quiet=rank != 0)
    usable = len(chosen) - len(chosen) % world
    mine = np.arange(rank, usable, world, dtype=np.int64)
    batches = []
    for a in range(0, len(mine), batch_size):
        pos = mine[a : a + batch_size]
        store = [chosen[p][0] for p in pos]
        window = [chosen[p][1] for p in pos]
        batches.append(ex.batch(store, window, pos, _VAL_SEED, _VAL_STREAM))
    return batches
