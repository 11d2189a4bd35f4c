"""Training micro-batches for one rank, in the global order, prefetched by a background thread.

Vocabulary:
    window      a unit of a split as the task cuts it (data/windows.py): a fixed-length slice
                of the token stream, a packed window of examples, or one example
    G           global batch = micro_batch * grad_accum * world samples per optimizer step
    sample g    position g in the global order (epoch included): the sample_ids of the batches
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from typing import Any

import numpy as np
from zeroforge.pipeline.data.order import GlobalOrder, mixture_counts
from zeroforge.pipeline.data.windows import SplitWindows, open_stores
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.tasks.base import Task

log = logging.getLogger(__name__)

STATE_VERSION = 1
# RNG stream of training examples (span masks); evaluation uses its own (eval_set.py).
TRAIN_STREAM = 0


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
        task: Task,
        micro_batch: int,
        grad_accum: int,
        rank: int,
        world: int,
        seed: int,
        state: dict | None = None,
        pin_memory: bool = False,
    ):
        if micro_batch < 1 or grad_accum < 1 or world < 1 or not 0 <= rank < world:
            raise ConfigError(
                f"bad batch layout: micro_batch={micro_batch}, grad_accum={grad_accum}, "
                f"rank={rank}, world={world}"
            )
        cfg = task.data
        self.windows = SplitWindows(cfg, open_stores(cfg), "train", task, seed)
        self.cfg, self.task, self.seed = cfg, task, seed
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.rank, self.world = rank, world
        # CUDA: batches in page-locked memory, so the step copies them without waiting.
        self.pin_memory = pin_memory
        self.global_batch = micro_batch * grad_accum * world
        ex = self.windows
        for i, n in enumerate(ex.counts):
            if n < 1:
                raise ConfigError(
                    f"data.seq_len={cfg.seq_len}: store {ex.paths[i]} has not one train "
                    f"{task.unit_name} for task {task.name} ({ex.splits[i].n_tokens} tokens, "
                    f"{ex.dropped[i]} examples too long)"
                )
        counts = mixture_counts(ex.weights, self.global_batch)
        if 0 in counts:
            raise ConfigError(
                f"data.mixture[{counts.index(0)}].weight is too small: it gets 0 of the "
                f"{self.global_batch} samples of each global batch; raise it or the batch size"
            )
        self.order = GlobalOrder(ex.counts, counts, seed)
        self._start = 0  # global samples consumed before this iteration began
        self._yielded = 0  # micro-batches handed to the caller since _start
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.prefetch)
        self._stop = threading.Event()
        self._waited = 0.0  # seconds __next__ spent waiting for the producer (take_wait)
        if state is not None:
            self.load_state_dict(state)
        self._sorted_steps: dict[int, np.ndarray] = {}  # first sample of a step -> ids by length
        if rank == 0:
            log.info(
                "data: %s over %s, %s %ss per epoch, %d samples per global step (%s)",
                task.name,
                ex.paths,
                ex.counts,
                task.unit_name,
                self.global_batch,
                counts,
            )
            if (dropped := ex.describe_dropped("train")) is not None:
                log.warning("data: %s", dropped)

    # -- geometry ---------------------------------------------------------------------------

    @property
    def tokens_per_global_step(self) -> int:
        """Tokens fed to the model per optimizer step (GPT: inputs; T5: encoder + decoder)."""
        return self.global_batch * self.task.layout.tokens_per_example

    def locate(self, sample_ids) -> tuple[np.ndarray, np.ndarray]:
        """(store index, window index) of global samples, e.g. a batch's ``sample_ids``."""
        store, _, window = self.order.locate(np.asarray(sample_ids, dtype=np.int64))
        return store, window

    def _micro_ids(self, step: int, micro: int) -> np.ndarray:
        offset = micro * self.micro_batch * self.world + self.rank * self.micro_batch
        if self.task.length_aware:
            return self._step_by_length(step)[offset:offset + self.micro_batch]
        base = self._start + step * self.global_batch
        return base + offset + np.arange(self.micro_batch, dtype=np.int64)

    def _step_by_length(self, step: int) -> np.ndarray:
        """The samples of a global step, shortest first (ties by sample id): the same
        arrangement on every rank and for any world size with the same global batch, so each
        micro-batch holds examples of similar length and pads little."""
        base = self._start + step * self.global_batch
        ids = self._sorted_steps.get(base)
        if ids is None:
            ids = base + np.arange(self.global_batch, dtype=np.int64)
            store, _, window = self.order.locate(ids)
            ids = ids[np.argsort(self.windows.lengths(store, window), kind="stable")]
            # Two steps at hand: the one being read and the one read-ahead asks about.
            if len(self._sorted_steps) >= 2:
                self._sorted_steps.pop(next(iter(self._sorted_steps)))
            self._sorted_steps[base] = ids
        return ids

    def _make(self, step: int, micro: int) -> dict:
        g = self._micro_ids(step, micro)
        store, _, window = self.order.locate(g)
        batch = self.task.batch(self.windows.windows(store, window), g, self.seed, TRAIN_STREAM)
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch

    def step_windows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(store, window) of every sample this rank reads at global step ``step`` (counted
        from where this iteration started), in the order it reads them."""
        ids = np.concatenate([self._micro_ids(step, m) for m in range(self.grad_accum)])
        store, _, window = self.order.locate(ids)
        return store, window

    def read_ahead(self, step: int) -> None:
        """Ask the stores for this rank's windows of ``step``: the global order says exactly
        which they are, so a remote store fetches them before they are needed."""
        self.windows.prefetch(*self.step_windows(step))

    # -- state ------------------------------------------------------------------------------

    def _order_identity(self) -> dict[str, Any]:
        """What must not change across a resume, because it changes the global order."""
        ex = self.windows
        return {
            "task": self.task.name,
            "seq_len": self.cfg.seq_len,
            "seed": self.seed,
            "stores": [s.fingerprint for s in ex.stores],
            "weights": ex.weights,
            **self.task.order_identity(),
        }

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
            raise ConfigError(
                f"data loader state version {state.get('version')!r} is not {STATE_VERSION}"
            )
        mine, theirs = self._order_identity(), state.get("order", {})
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if changed:
            detail = ", ".join(
                f"{k}: saved {theirs.get(k)!r}, now {mine.get(k)!r}" for k in changed
            )
            raise ConfigError(f"data loader state is from a different data order ({detail})")
        samples = state["samples"]
        if not isinstance(samples, int) or samples < 0:
            raise ConfigError(f"data loader state has bad samples={samples!r}")
        # A mixture's per-store positions are defined per global batch, so G must stay.
        if len(self.windows.stores) > 1 and state.get("global_batch") != self.global_batch:
            raise ConfigError(
                f"global batch changed from {state.get('global_batch')} to {self.global_batch}: "
                "a data mixture resumes only with the same micro_batch * grad_accum * world"
            )
        if len(self.windows.stores) > 1 and samples % self.global_batch:
            raise ConfigError(
                f"data loader state samples={samples} is not at a global batch boundary"
            )
        if state.get("epoch") != min(self.order.store_epochs(samples)):
            raise ConfigError(f"data loader state is inconsistent: {state}")
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

        # Local stores are mapped files: nothing to fetch ahead, so no hints to compute.
        remote = any(not s.local for s in self.windows.stores)
        ahead = self.cfg.readahead_steps if remote else 0
        try:
            for step in range(start_step, start_step + ahead):
                self.read_ahead(step)
            for step in itertools.count(start_step):
                if ahead:
                    self.read_ahead(step + ahead)
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
        t0 = time.perf_counter()
        item = self._queue.get()
        self._waited += time.perf_counter() - t0
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        self._yielded += 1
        return item

    def take_wait(self) -> float:
        """Seconds spent waiting for data since the previous call (the data wait metric)."""
        waited, self._waited = self._waited, 0.0
        return waited

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
