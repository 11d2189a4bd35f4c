"""Fine-tuning data on real stores: packing (deterministic, whole examples, within capacity),
the sft and seq2seq batches, world-size independence of their order, document masking of
pretraining windows."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from zeroforge.data_prep.build import PrepOptions, build_store
from zeroforge.data_prep.examples import ExampleOptions
from zeroforge.data_prep.sources import SourceOptions
from zeroforge.data_prep.store import Layout, TokenStore
from zeroforge.model import EncDecConfig, GPT2Config
from zeroforge.pipeline.data.config import DataConfig
from zeroforge.pipeline.data.examples import ExampleSpans, PackedUnits
from zeroforge.pipeline.data.loader import TrainLoader
from zeroforge.pipeline.data.packing import first_fit_decreasing
from zeroforge.pipeline.errors import ConfigError
from zeroforge.pipeline.registry import make_task
from zeroforge.pipeline.tasks.base import IGNORE_INDEX, SpecialIds
from zeroforge.pipeline.tasks.next_token import NextToken
from zeroforge.pipeline.tasks.seq2seq import split_pair

EOT = 50256


def _build(path, fmt, rows=None, **kw):
    inputs = ["builtin:pydoc-qa"]
    if rows is not None:
        src = path.parent / f"{path.name}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        inputs = [str(src)]
    build_store(inputs, path, PrepOptions(val_fraction=0.1, progress=False,
                                          examples=ExampleOptions(format=fmt, **kw)))
    return str(path)


@pytest.fixture(scope="module")
def sft_store(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("sft") / "s", "sft", template="chat")


@pytest.fixture(scope="module")
def pairs_store(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("pairs") / "p", "pairs")


def _sft(store, seq_len=64):
    s = TokenStore.open(store)
    return make_task("sft", DataConfig(store=store, seq_len=seq_len),
                     GPT2Config.preset("gpt2-tiny"), s.examples)


def test_first_fit_decreasing_fills_bins_within_capacity():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 200, size=3000)
    bins = first_fit_decreasing(sizes, 256)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(sizes)))  # every item exactly once
    assert all(sizes[b].sum() <= 256 for b in bins)
    assert sizes.sum() / (256 * len(bins)) > 0.97  # FFD leaves little room on such a mix


def test_packing_is_deterministic_whole_and_within_the_window(sft_store):
    split = TokenStore.open(sft_store).split("train")
    a, b = PackedUnits(split, 64, seed=3, store=0), PackedUnits(split, 64, seed=3, store=0)
    assert [x.tolist() for x in a.bins] == [x.tolist() for x in b.bins]
    other = PackedUnits(split, 64, seed=4, store=0)
    assert [x.tolist() for x in a.bins] != [x.tolist() for x in other.bins]
    sizes = np.diff(split.doc_offsets) - 1
    fits = set(np.nonzero(sizes <= 64)[0].tolist())
    packed = [int(e) for x in a.bins for e in x]
    assert sorted(packed) == sorted(fits) and len(packed) == len(set(packed))
    assert a.dropped == split.n_docs - len(fits) > 0  # the long answers do not fit 64
    assert all(sizes[x].sum() <= 64 for x in a.bins)


def test_sft_rows_hold_whole_examples_with_their_mask(sft_store):
    task = _sft(sft_store)
    split = TokenStore.open(sft_store).split("train")
    units, spans = task.units(split, 0, 0), ExampleSpans(split)
    batch = task.batch([units.get(i) for i in range(6)], list(range(6)), 0, 0)
    for row in range(6):
        inputs, labels = batch["input_ids"][row], batch["labels"][row]
        seg = batch["segment_ids"][row]
        for k, example in enumerate(units.bins[row]):
            tokens, mask = spans.read(int(example))
            at = torch.nonzero(seg == k).flatten()
            assert at.tolist() == list(range(int(at[0]), int(at[0]) + len(tokens) - 1))
            assert inputs[at].tolist() == tokens[:-1].tolist()
            want = np.where(mask[1:] == 1, tokens[1:].astype(np.int64), IGNORE_INDEX)
            assert labels[at].tolist() == want.tolist()
            assert labels[at][-1] == EOT  # the example's EOT is a target
        pad = seg == -1
        assert (labels[pad] == IGNORE_INDEX).all()


def _ids_and_batches(task, micro, accum, world, steps):
    """Every rank's micro-batches of ``steps`` steps, arranged in global-step order."""
    per_step = []
    loaders = [TrainLoader(task, micro, accum, r, world, seed=9) for r in range(world)]
    try:
        for _ in range(steps):
            step = []
            for _ in range(accum):
                for ld in loaders:
                    step.append(next(ld))
            per_step.append(step)
    finally:
        for ld in loaders:
            ld.close()
    return per_step


@pytest.mark.parametrize("name", ["sft", "seq2seq"])
def test_world_size_and_accum_only_regroup_the_same_samples(sft_store, pairs_store, name):
    task = _sft(sft_store) if name == "sft" else _seq2seq(pairs_store)
    one = _ids_and_batches(task, 2, 2, 1, 3)  # 1 rank, accum 2
    two = _ids_and_batches(task, 2, 1, 2, 3)  # 2 ranks, accum 1
    for a, b in zip(one, two, strict=True):
        ids_a = torch.cat([m["sample_ids"] for m in a]).tolist()
        ids_b = torch.cat([m["sample_ids"] for m in b]).tolist()
        assert ids_a == ids_b
        for ma, mb in zip(a, b, strict=True):
            assert ma.keys() == mb.keys()
            for key in ma:
                assert torch.equal(ma[key], mb[key]), key


def _seq2seq(store):
    cfg = EncDecConfig.preset("t5-tiny")
    return make_task("seq2seq", DataConfig(store=store, seq_len=48, target_len=96), cfg,
                     TokenStore.open(store).examples)


def test_seq2seq_batches_are_length_sorted_and_masked(pairs_store):
    task = _seq2seq(pairs_store)
    with TrainLoader(task, 4, 2, 0, 1, seed=1) as ld:
        first, second = next(ld), next(ld)
    lengths = [int(m["attention_mask"][i].sum() + m["decoder_attention_mask"][i].sum())
               for m in (first, second) for i in range(4)]
    assert lengths == sorted(lengths)  # the step's 8 examples, shortest first
    split = TokenStore.open(pairs_store).split("train")
    units = task.units(split, 1, 0)
    store, window = ld.locate(first["sample_ids"])
    for row, w in enumerate(window):
        src, tgt = split_pair(*units.get(int(w)))
        n, m = len(src), len(tgt)
        assert first["input_ids"][row, :n].tolist() == src.tolist()
        assert first["attention_mask"][row].tolist() == [1] * n + [0] * (
            first["attention_mask"].shape[1] - n)
        assert first["labels"][row, :m].tolist() == tgt.tolist() and tgt[-1] == EOT
        assert (first["labels"][row, m:] == IGNORE_INDEX).all()
        dec = first["decoder_input_ids"][row, :m].tolist()
        assert dec == [task.special.decoder_start] + tgt[:-1].tolist()


def test_seq2seq_refuses_a_text_store(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("just some text " * 50)
    build_store([str(src)], tmp_path / "t", PrepOptions(progress=False))
    task = make_task("seq2seq", DataConfig(store=str(tmp_path / "t")),
                     EncDecConfig.preset("t5-tiny"))
    with pytest.raises(ConfigError, match="task seq2seq trains on pairs stores.*--format pairs"):
        TrainLoader(task, 1, 1, 0, 1, seed=0)


def test_document_mask_segments_pretraining_windows(tmp_path):
    rng = random.Random(0)
    src = tmp_path / "d.txt"
    src.write_text("\n".join(" ".join(rng.choice(["a", "b", "c"]) for _ in range(rng.randint(
        1, 12))) for _ in range(200)))
    build_store([str(src)], tmp_path / "s", PrepOptions(
        progress=False, source=SourceOptions(text_mode="line")))
    cfg = DataConfig(store=str(tmp_path / "s"), seq_len=32, document_mask=True)
    with TrainLoader(NextToken(cfg, SpecialIds(eos=EOT)), 4, 1, 0, 1, seed=0) as ld:
        b = next(ld)
    x, seg = b["input_ids"], b["segment_ids"]
    for row in range(4):
        expect = np.cumsum(x[row].numpy() == EOT)  # each EOT opens the next document
        assert seg[row].tolist() == expect.tolist()
        assert seg[row].max() > 0, "windows of short lines hold several documents"
    with TrainLoader(NextToken(cfg.model_copy(update={"document_mask": False}),
                               SpecialIds(eos=EOT)), 4, 1, 0, 1, seed=0) as ld:
        plain = next(ld)
    assert "segment_ids" not in plain and torch.equal(plain["input_ids"], x)


def test_loss_tokens_per_example_across_shard_boundaries(tmp_path):
    """ExampleSpans.loss_tokens reads the mask a shard at a time; examples that straddle a
    shard boundary count both parts."""
    build_store(["builtin:pydoc-qa"], tmp_path / "p", PrepOptions(
        progress=False, layout=Layout(shard_tokens=1024, chunk_tokens=256),
        examples=ExampleOptions(format="pairs")))
    split = TokenStore.open(tmp_path / "p").split("train")
    spans = ExampleSpans(split)
    want = [int(spans.read(i)[1].sum()) for i in range(len(spans))]
    assert spans.loss_tokens().tolist() == want
    ends = spans.starts + spans.lengths
    assert any(s // 1024 != (e - 1) // 1024 for s, e in zip(spans.starts, ends, strict=True))
