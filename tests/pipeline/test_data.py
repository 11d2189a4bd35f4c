"""pipeline/data/ against real token stores built with data_prep.build_store (no mocks)."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch
from zeroforge.data_prep.build import PrepOptions, build_store
from zeroforge.data_prep.sources import SourceOptions
from zeroforge.data_prep.store import TokenStore
from zeroforge.pipeline.data.config import DataConfig
from zeroforge.pipeline.data.eval_set import eval_batches
from zeroforge.pipeline.data.loader import TrainLoader
from zeroforge.pipeline.data.order import FeistelPermutation, GlobalOrder, mixture_counts
from zeroforge.pipeline.tasks.base import SpecialIds
from zeroforge.pipeline.tasks.next_token import NextToken


def gpt(cfg: DataConfig) -> NextToken:
    return NextToken(cfg, SpecialIds(eos=50256))

SEQ = 16  # small windows so an epoch is a few hundred samples


def _write_corpus(path, words, n_lines, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_lines):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + f" line {i}\n")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two small real stores (one document per line) with different vocabularies."""
    root = tmp_path_factory.mktemp("stores")
    opts = PrepOptions(val_fraction=0.2, source=SourceOptions(text_mode="line"), progress=False)
    out = {}
    for name, words, n in [
        ("a", "alpha beta gamma delta epsilon zeta eta theta".split(), 300),
        ("b", "red green blue cyan magenta yellow black white".split(), 150),
    ]:
        _write_corpus(root / f"{name}.txt", words, n, seed=len(name) + n)
        build_store([str(root / f"{name}.txt")], root / name, opts)
        out[name] = str(root / name)
    return out


def _loader(store, micro=2, accum=1, rank=0, world=1, seed=0, state=None, **cfg):
    cfg = DataConfig(store=store, seq_len=SEQ, **cfg) if isinstance(store, str) else cfg["cfg"]
    return TrainLoader(gpt(cfg), micro, accum, rank, world, seed=seed, state=state)


def _take(loader, n_micro):
    out = [next(loader) for _ in range(n_micro)]
    return out


def _global_steps(world, micro, accum, store, steps, seed=0, start_state=None):
    """sample_ids and input_ids per global step, concatenated over ranks in rank order."""
    per_rank = []
    for rank in range(world):
        with _loader(store, micro, accum, rank, world, seed, state=start_state) as ld:
            per_rank.append(_take(ld, steps * accum))
    result = []
    for s in range(steps):
        ids, x = [], []
        for m in range(accum):
            for rank in range(world):  # micro m of every rank forms one block of the step
                b = per_rank[rank][s * accum + m]
                ids.append(b["sample_ids"])
                x.append(b["input_ids"])
        result.append((torch.cat(ids), torch.cat(x)))
    return result


# ------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_feistel_is_a_bijection(n):
    perm = FeistelPermutation(n, key=[1, 2, 3, 4, 5, 6])(np.arange(n))
    assert sorted(perm.tolist()) == list(range(n))


def test_feistel_depends_on_key():
    a = FeistelPermutation(1000, key=[1, 2, 3, 4, 5, 6])(np.arange(1000))
    b = FeistelPermutation(1000, key=[1, 2, 3, 4, 5, 7])(np.arange(1000))
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, np.arange(1000))  # it does shuffle


def test_mixture_counts_largest_remainder():
    assert mixture_counts([1.0], 8) == [8]
    assert mixture_counts([0.5, 0.3, 0.2], 10) == [5, 3, 2]
    assert mixture_counts([1, 1, 1], 8) == [3, 3, 2]  # ties go to the earlier store
    assert mixture_counts([0.7, 0.2, 0.1], 16) == [11, 3, 2]  # 11.2, 3.2, 1.6
    for g in range(1, 50):
        assert sum(mixture_counts([0.37, 0.41, 0.22], g)) == g


def test_global_order_spreads_a_mixture_over_the_batch():
    order = GlobalOrder([50, 70], counts=[6, 2], seed=0)
    store, _ = order.store_samples(np.arange(8))
    assert store.tolist() == [0, 0, 1, 0, 0, 0, 1, 0]


def test_config_validate_collects_every_problem():
    assert DataConfig(store="x").problems() == []
    problems = DataConfig(
        store="x",
        mixture=[{"store": "y", "weight": -1, "extra": 1}],
        seq_len=1,
        prefetch=0,
        noise_density=1.5,
        mean_span_length=0.5,
        val_windows=-1,
    ).problems()
    text = "\n".join(problems)
    for key in [
        "data.store or data.mixture",
        "data.mixture[0].weight",
        "data.mixture[0] must only",
        "data.seq_len",
        "data.prefetch",
        "data.noise_density",
        "data.mean_span_length",
        "data.val_windows",
    ]:
        assert key in text
    assert DataConfig().problems() == [
        "data.store or data.mixture must be set (exactly one of them)"
    ]


def test_bad_store_path_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.store: no token store"):
        TrainLoader(gpt(DataConfig(store=str(tmp_path / "nope"))), 1, 1, 0, 1, seed=0)
    with pytest.raises(ValueError, match=r"data.mixture\[1\].store: no token store"):
        cfg = DataConfig(
            mixture=[
                {"store": str(tmp_path), "weight": 1},
                {"store": str(tmp_path / "nope"), "weight": 1},
            ]
        )
        TrainLoader(gpt(cfg), 1, 1, 0, 1, seed=0)


# ------------------------------------------------------------------------- GPT order


def test_same_seed_same_batches_other_seed_other_batches(stores):
    with _loader(stores["a"], seed=3) as a, _loader(stores["a"], seed=3) as b:
        for x, y in zip(_take(a, 5), _take(b, 5), strict=True):
            assert torch.equal(x["input_ids"], y["input_ids"])
            assert torch.equal(x["sample_ids"], y["sample_ids"])
    with _loader(stores["a"], seed=3) as a, _loader(stores["a"], seed=4) as b:
        xa = torch.cat([m["input_ids"] for m in _take(a, 5)])
        xb = torch.cat([m["input_ids"] for m in _take(b, 5)])
        assert not torch.equal(xa, xb)


def test_epochs_wrap_and_cover_every_window_once(stores):
    micro = 7  # does not divide the epoch: a global batch straddles the epoch boundary
    with _loader(stores["a"], micro=micro) as ld:
        n = ld.order.windows_per_epoch[0]
        steps = (2 * n + 3) // micro + 1
        ids = torch.cat([b["sample_ids"] for b in _take(ld, steps)]).numpy()
        assert ids.tolist() == list(range(steps * micro))  # no gap, no repeat
        _, windows = ld.locate(ids)
        first, second = windows[:n], windows[n : 2 * n]
        assert sorted(first.tolist()) == list(range(n))
        assert sorted(second.tolist()) == list(range(n))
        assert not np.array_equal(first, second)  # each epoch has its own permutation
        assert ld.state_dict()["epoch"] == steps * micro // n


def test_targets_are_shifted_inputs_from_the_store(stores):
    split = TokenStore.open(stores["a"]).split("train")
    with _loader(stores["a"], micro=4) as ld:
        for b in _take(ld, 3):
            assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape == (4, SEQ)
            assert b["targets"].shape == (4, SEQ) and b["sample_ids"].shape == (4,)
            assert torch.equal(b["input_ids"][:, 1:], b["targets"][:, :-1])
            _, windows = ld.locate(b["sample_ids"])
            for row, w in enumerate(windows.tolist()):
                # window w = tokens [w*SEQ, w*SEQ + SEQ + 1): stride SEQ, one token of overlap
                expect = torch.from_numpy(split.tokens(w * SEQ, w * SEQ + SEQ + 1).astype(np.int64))
                assert torch.equal(b["input_ids"][row], expect[:-1])
                assert torch.equal(b["targets"][row], expect[1:])
        assert ld.order.windows_per_epoch == [(split.n_tokens - 1) // SEQ]


def test_union_over_ranks_equals_single_rank(stores):
    two = _global_steps(world=2, micro=2, accum=1, store=stores["a"], steps=4)
    one = _global_steps(world=1, micro=2, accum=2, store=stores["a"], steps=4)
    for (ids2, x2), (ids1, x1) in zip(two, one, strict=True):
        assert torch.equal(ids2, ids1) and torch.equal(x2, x1)
    assert torch.cat([ids for ids, _ in one]).tolist() == list(range(16))


def test_resume_mid_run_equals_uninterrupted(stores):
    with _loader(stores["a"], micro=2, accum=3) as ld:
        full = _take(ld, 5 * 3)
    with _loader(stores["a"], micro=2, accum=3) as ld:
        _take(ld, 2 * 3 + 1)  # the prefetch thread is ahead and one micro-batch into step 3
        state = ld.state_dict()
    assert state["samples"] == 2 * 6 and state["version"] == 1
    with _loader(stores["a"], micro=2, accum=3, state=state) as ld:
        resumed = _take(ld, 3 * 3)
    for a, b in zip(full[6:], resumed, strict=True):
        assert torch.equal(a["sample_ids"], b["sample_ids"])
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_load_state_dict_restarts_the_stream(stores):
    with _loader(stores["a"], micro=2, accum=2) as ld:
        first = _take(ld, 4)
        state = {**ld.state_dict()}
        _take(ld, 6)
        ld.load_state_dict(state)
        again = _take(ld, 2)
        assert [b["sample_ids"].tolist() for b in again] == [[8, 9], [10, 11]]
        ld.load_state_dict({**state, "samples": 0, "epoch": 0})
        assert torch.equal(next(ld)["input_ids"], first[0]["input_ids"])


def test_resume_world_2_to_1_keeps_the_global_order(stores):
    reference = _global_steps(world=2, micro=2, accum=1, store=stores["a"], steps=6)
    with _loader(stores["a"], micro=2, accum=1, rank=1, world=2) as ld:
        _take(ld, 3)
        state = ld.state_dict()
    assert state["samples"] == 3 * 4
    resumed = _global_steps(
        world=1, micro=2, accum=2, store=stores["a"], steps=3, start_state=state
    )
    for (ids_r, x_r), (ids, x) in zip(reference[3:], resumed, strict=True):
        assert torch.equal(ids_r, ids) and torch.equal(x_r, x)


def test_state_refuses_a_different_order(stores):
    with _loader(stores["a"], seed=1) as ld:
        next(ld)
        state = ld.state_dict()
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        _loader(stores["a"], seed=2, state=state)
    with pytest.raises(ValueError, match="version"):
        _loader(stores["a"], seed=1, state={**state, "version": 99})


def test_tokens_per_global_step(stores):
    with _loader(stores["a"], micro=3, accum=2, rank=1, world=2) as ld:
        assert ld.tokens_per_global_step == 3 * 2 * 2 * SEQ


# ------------------------------------------------------------------------- mixtures


def _mixture(stores, wa=0.75, wb=0.25):
    return DataConfig(
        mixture=[{"store": stores["a"], "weight": wa}, {"store": stores["b"], "weight": wb}],
        seq_len=SEQ,
    )


def test_mixture_counts_are_exact_per_global_batch(stores):
    cfg = _mixture(stores, 0.7, 0.3)
    split_b = TokenStore.open(stores["b"]).split("train")
    with TrainLoader(gpt(cfg), 5, 2, 0, 1, seed=0) as ld:  # G = 10 -> 7 + 3
        assert ld.order.counts == [7, 3]
        n_b = ld.order.windows_per_epoch[1]
        steps = n_b // 3 + 2  # store b wraps its epoch, store a does not
        seen_b = []
        for _ in range(steps):
            ids = torch.cat([next(ld)["sample_ids"] for _ in range(2)])
            store, windows = ld.locate(ids)
            assert np.bincount(store, minlength=2).tolist() == [7, 3]
            seen_b += windows[store == 1].tolist()
        assert sorted(seen_b[:n_b]) == list(range(n_b))  # store b's first epoch, each window once
        state = ld.state_dict()
        assert state["store_epochs"] == [
            steps * 7 // ld.order.windows_per_epoch[0],
            steps * 3 // n_b,
        ]
        assert state["epoch"] == min(state["store_epochs"])
        # the tokens come from the store the order says
        b = next(ld)
        store, windows = ld.locate(b["sample_ids"])
        row = int(np.flatnonzero(store == 1)[0])
        w = int(windows[row])
        assert b["input_ids"][row].tolist() == split_b.tokens(w * SEQ, w * SEQ + SEQ).tolist()


def test_mixture_is_deterministic_and_resumable(stores):
    cfg = _mixture(stores)
    with TrainLoader(gpt(cfg), 2, 2, 0, 1, seed=5) as ld:
        full = _take(ld, 8)
    with TrainLoader(gpt(cfg), 2, 2, 0, 1, seed=5) as ld:
        assert all(
            torch.equal(a["input_ids"], b["input_ids"])
            for a, b in zip(full, _take(ld, 8), strict=True)
        )
        state = ld.state_dict()
    assert state["samples"] == 4 * 4
    # world 2 -> 1 with the same global batch: same samples, same order
    with (
        TrainLoader(gpt(cfg), 2, 1, 0, 2, seed=5, state={**state, "samples": 8, "epoch": 0}
        ) as r0,
        TrainLoader(gpt(cfg), 2, 1, 1, 2, seed=5, state={**state, "samples": 8, "epoch": 0}
        ) as r1,
    ):
        for s in range(2):
            a, b = next(r0), next(r1)
            joined = torch.cat([a["input_ids"], b["input_ids"]])
            assert torch.equal(
                joined, torch.cat([full[4 + 2 * s]["input_ids"], full[5 + 2 * s]["input_ids"]])
            )
    with pytest.raises(ValueError, match="global batch changed"):
        TrainLoader(gpt(cfg), 4, 2, 0, 1, seed=5, state=state)


def test_mixture_weight_too_small_is_an_error(stores):
    with pytest.raises(ValueError, match=r"data.mixture\[1\].weight is too small"):
        TrainLoader(gpt(_mixture(stores, 0.99, 0.01)), 2, 1, 0, 1, seed=0)


# ------------------------------------------------------------------------- validation


def test_val_batches_are_fixed_and_independent_of_world(stores):
    cfg = DataConfig(store=stores["a"], seq_len=SEQ, val_windows=12)
    once = eval_batches(gpt(cfg), 4, 0, 1)
    again = eval_batches(gpt(cfg), 4, 0, 1)
    assert [b["sample_ids"].tolist() for b in once] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    for a, b in zip(once, again, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(
            a["targets"], b["targets"]
        )
    by_id = {
        int(i): row for b in once for i, row in zip(b["sample_ids"], b["input_ids"], strict=True)
    }
    for world in (2, 3, 4):
        seen = {}
        counts = []
        for rank in range(world):
            mine = eval_batches(gpt(cfg), 2, rank, world)
            counts.append(len(mine))
            for b in mine:
                seen.update(
                    {int(i): r for i, r in zip(b["sample_ids"], b["input_ids"], strict=True)}
                )
        assert len(set(counts)) == 1  # every rank runs the same number of forward passes
        assert sorted(seen) == list(range(12))
        assert all(torch.equal(seen[i], by_id[i]) for i in seen)


def test_val_batches_mixture_and_zero(stores):
    cfg = _mixture(stores)
    cfg.val_windows = 8
    batches = eval_batches(gpt(cfg), 8, 0, 1)
    assert len(batches) == 1 and batches[0]["input_ids"].shape == (8, SEQ)
    cfg.val_windows = 0
    assert eval_batches(gpt(cfg), 8, 0, 1) == []


# ------------------------------------------------------------------------- prefetch thread


def _data_threads():
    return [t for t in threading.enumerate() if t.name.startswith("zeroforge-data")]


def test_close_stops_the_prefetch_thread(stores):
    ld = _loader(stores["a"], prefetch=2)
    assert _data_threads() == []  # started lazily, on the first batch
    next(ld)
    assert len(_data_threads()) == 1
    ld.close()
    assert _data_threads() == []
    next(ld)  # iterating again restarts it
    ld.load_state_dict(ld.state_dict())  # ... and loading a state stops it
    assert _data_threads() == []
    next(ld)
    ld.close()
    ld.close()  # idempotent
    assert _data_threads() == []


def test_val_without_val_tokens_says_what_to_do(tmp_path):
    (tmp_path / "one.txt").write_text("a single document, so the val split stays empty\n")
    opts = PrepOptions(val_fraction=0.0, progress=False)
    build_store([str(tmp_path / "one.txt")], tmp_path / "s", opts)
    cfg = DataConfig(store=str(tmp_path / "s"), seq_len=4)
    with pytest.raises(ValueError, match="data.val_windows: 0"):
        eval_batches(gpt(cfg), 2, 0, 1)


def test_a_mixture_with_a_store_on_s3_gives_the_batches_of_the_local_one(stores, s3_server,
                                                                         monkeypatch, tmp_path):
    """Store b copied into a bucket of a real S3 server: the mixture reads the same batches, in
    the same order, with the loader's read-ahead fetching b's chunks before they are needed."""
    from pathlib import Path

    from zeroforge.data_prep.locations import open_storage

    s3_server.use(monkeypatch)
    monkeypatch.setenv("ZEROFORGE_CACHE_DIR", str(tmp_path / "cache"))
    url = s3_server.new_bucket() + "/b"
    remote, root = open_storage(url), Path(stores["b"])
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        remote.write(f.relative_to(root).as_posix(), f.read_bytes())
    on_s3 = DataConfig(mixture=[{"store": stores["a"], "weight": 0.75},
                                {"store": url, "weight": 0.25}], seq_len=SEQ)
    with TrainLoader(gpt(_mixture(stores)), 2, 2, 0, 1, seed=5) as ld:
        want = _take(ld, 12)
    with TrainLoader(gpt(on_s3), 2, 2, 0, 1, seed=5) as ld:
        got = _take(ld, 12)
        assert not ld.windows.stores[1].local
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_read_ahead_fetches_exactly_the_chunks_of_the_step_asked_for(stores, s3_server,
                                                                     monkeypatch, tmp_path):
    """The loader knows every future step's windows from the global order: asking for step 7
    fetches the chunks of rank 1's step-7 windows, and nothing else."""
    from pathlib import Path

    from zeroforge.data_prep.store import Layout

    s3_server.use(monkeypatch)
    url = s3_server.new_bucket() + "/a"
    small = Layout(shard_tokens=1024, chunk_tokens=128, offsets_shard=1024, offsets_chunk=256)
    build_store([str(Path(stores["a"]).parent / "a.txt")], url, PrepOptions(
        val_fraction=0.2, source=SourceOptions(text_mode="line"), layout=small, progress=False))
    cache = tmp_path / "cache"
    cfg = DataConfig(store=url, seq_len=SEQ, cache_dir=str(cache))
    ld = TrainLoader(gpt(cfg), 2, 2, 1, 2, seed=3)
    store = ld.windows.stores[0]
    layout = store.layout
    _, windows = ld.step_windows(7)
    assert len(windows) == 4  # micro-batch 2 x 2 accumulation steps, this rank's share
    assert store.split("train").n_tokens > 10 * small.chunk_tokens
    ld.read_ahead(7)
    store.close()  # waits for the background fetches
    chunks = {(int(p.parent.name), int(p.name)) for p in cache.rglob("*")
              if p.is_file() and "train/tokens" in p.as_posix() and p.name.isdigit()}
    want = set()
    for w in windows.tolist():
        for t in (w * SEQ, w * SEQ + SEQ):  # first and last token of the window
            shard, within = divmod(t, layout.shard_tokens)
            want.add((shard, within // layout.chunk_tokens))
    assert chunks == want
    ld.close()
