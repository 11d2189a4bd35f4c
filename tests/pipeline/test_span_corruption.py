"""T5 span corruption: length formula, mask properties, and T5 batches from a real token store."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from zeroforge.data_prep.build import PrepOptions, build_store
from zeroforge.data_prep.sources import SourceOptions
from zeroforge.data_prep.store import TokenStore
from zeroforge.model.sentinels import sentinel_ids as model_sentinel_ids
from zeroforge.pipeline.data.config import DataConfig
from zeroforge.pipeline.data.eval_set import eval_batches
from zeroforge.pipeline.data.loader import TrainLoader
from zeroforge.pipeline.tasks.base import SpecialIds
from zeroforge.pipeline.tasks.span_corruption import (
    SpanCorruption,
    corrupt,
    corrupted_lengths,
    example_rng,
    n_spans,
    noise_mask,
    t5_lengths,
)

VOCAB, EOT = 50257, 50256
SENTINELS = model_sentinel_ids(SimpleNamespace(vocab_size=VOCAB, n_sentinels=100))
PAD = EOT  # the encoder-decoder model's pad_token_id (= decoder start token)


def reconstruct(inputs, targets, sentinels=SENTINELS):
    """Undo span corruption: put each sentinel's target span back in place of the sentinel."""
    sentinel_set = set(sentinels)
    assert targets[-1] == EOT
    spans, current = {}, None
    for t in targets[:-1]:
        if t in sentinel_set:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs:
        out += spans[t] if t in sentinel_set else [t]
    return out


# ------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("density,mean", [(0.15, 3.0), (0.15, 1.0), (0.3, 5.0), (0.5, 2.0)])
def test_t5_lengths_give_exact_encoder_length(density, mean):
    for enc in list(range(2, 200)) + [256, 512, 1000, 1024, 2048]:
        raw, dec = t5_lengths(enc, density, mean)
        assert corrupted_lengths(raw, density, mean) == (enc, dec)
        # the largest such raw length: one more token no longer fits the encoder
        assert corrupted_lengths(raw + 1, density, mean)[0] == enc + 1


def test_t5_lengths_match_t5_up_to_the_input_eos():
    # T5 (with an EOS on the inputs) uses 568 raw tokens for 512 inputs and 114 targets; we put
    # no EOS on the encoder input, so one more raw token fits and the targets stay 114.
    assert t5_lengths(512, 0.15, 3.0) == (569, 114)
    assert n_spans(569, 0.15, 3.0) == 28


def test_t5_lengths_reject_bad_settings():
    with pytest.raises(ValueError, match="data.noise_density"):
        t5_lengths(512, 0.0, 3.0)
    with pytest.raises(ValueError, match="data.mean_span_length"):
        t5_lengths(512, 0.15, 0.5)
    with pytest.raises(ValueError, match="data.seq_len"):
        t5_lengths(1, 0.15, 3.0)


# ------------------------------------------------------------------------- one example


def test_corrupt_lengths_sentinels_and_reconstruction():
    raw_len, dec_len = t5_lengths(128, 0.15, 3.0)
    spans = n_spans(raw_len, 0.15, 3.0)
    noise_total = 0
    for index in range(50):
        raw = np.random.default_rng(index).integers(0, VOCAB - 1, raw_len).astype(np.uint16)
        inputs, targets = corrupt(raw, 0.15, 3.0, SENTINELS, EOT, example_rng(7, 0, index))
        assert inputs.dtype == np.int64 and len(inputs) == 128 and len(targets) == dec_len
        # sentinels appear once each, in order, in both sequences
        assert [t for t in inputs if t >= VOCAB] == SENTINELS[:spans]
        assert [t for t in targets if t >= VOCAB] == SENTINELS[:spans]
        assert targets[0] == SENTINELS[0] and targets[-1] == EOT
        assert reconstruct(inputs.tolist(), targets.tolist()) == raw.tolist()
        noise_total += len(targets) - spans - 1
    assert noise_total / (50 * raw_len) == pytest.approx(0.15, abs=0.01)


def test_mask_is_a_pure_function_of_seed_and_index():
    masks = [noise_mask(500, 0.15, 3.0, example_rng(1, 0, i)) for i in range(20)]
    assert all(
        np.array_equal(m, noise_mask(500, 0.15, 3.0, example_rng(1, 0, i)))
        for i, m in enumerate(masks)
    )
    assert len({m.tobytes() for m in masks}) == 20  # different samples, different masks
    assert not np.array_equal(masks[0], noise_mask(500, 0.15, 3.0, example_rng(2, 0, 0)))
    for m in masks:  # T5 layout: starts with non-noise, ends with noise, mean span ~3
        assert not m[0] and m[-1]
        starts = np.flatnonzero(m & ~np.concatenate(([False], m[:-1])))
        assert len(starts) == n_spans(500, 0.15, 3.0)


# ------------------------------------------------------------------------- T5 batches


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5store")
    rng = random.Random(0)
    words = "one two three four five six seven eight nine ten".split()
    with open(root / "c.txt", "w") as f:
        for i in range(250):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + f" {i}\n")
    opts = PrepOptions(val_fraction=0.2, source=SourceOptions(text_mode="line"), progress=False)
    build_store([str(root / "c.txt")], root / "s", opts)
    return str(root / "s")


def t5(cfg: DataConfig, sentinels=SENTINELS) -> SpanCorruption:
    return SpanCorruption(cfg, SpecialIds(eos=EOT, pad=PAD, decoder_start=PAD,
                                          sentinels=tuple(sentinels)))


def _t5(store, micro=2, accum=1, rank=0, world=1, state=None):
    cfg = DataConfig(store=store, seq_len=32)
    return TrainLoader(t5(cfg), micro, accum, rank, world, seed=11, state=state)


def test_t5_batches_from_store(store):
    raw_len, dec_len = t5_lengths(32, 0.15, 3.0)
    split = TokenStore.open(store).split("train")
    with _t5(store, micro=3) as ld:
        assert ld.tokens_per_global_step == 3 * (32 + dec_len)
        assert ld.order.windows_per_epoch == [split.n_tokens // raw_len]
        for b in [next(ld) for _ in range(4)]:
            assert b["input_ids"].shape == (3, 32) and b["labels"].shape == (3, dec_len)
            assert b["decoder_input_ids"].shape == (3, dec_len)
            assert all(v.dtype == torch.int64 for v in b.values())
            # decoder input = labels shifted right behind the start token (pad)
            assert (b["decoder_input_ids"][:, 0] == PAD).all()
            assert torch.equal(b["decoder_input_ids"][:, 1:], b["labels"][:, :-1])
            _, windows = ld.locate(b["sample_ids"])
            for row, w in enumerate(windows.tolist()):
                raw = split.tokens(
                    w * raw_len, (w + 1) * raw_len
                ).tolist()  # packed, stride raw_len
                assert reconstruct(b["input_ids"][row].tolist(), b["labels"][row].tolist()) == raw


def test_t5_masks_do_not_depend_on_world(store):
    with _t5(store, micro=2, accum=2) as one:
        single = [next(one) for _ in range(4)]
    with _t5(store, micro=2, rank=0, world=2) as r0, _t5(store, micro=2, rank=1, world=2) as r1:
        split = [b for _ in range(2) for b in (next(r0), next(r1))]
    for a, b in zip(single, split, strict=True):
        assert torch.equal(a["sample_ids"], b["sample_ids"])
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_t5_resume(store):
    with _t5(store, accum=2) as ld:
        full = [next(ld) for _ in range(6)]
    with _t5(store, accum=2) as ld:
        next(ld), next(ld)
        state = ld.state_dict()
    with _t5(store, accum=2, state=state) as ld:
        for a in full[2:]:
            assert torch.equal(a["labels"], next(ld)["labels"])


def test_t5_val_batches_fixed(store):
    cfg = DataConfig(store=store, seq_len=32, val_windows=6)
    a = eval_batches(t5(cfg), 4, 0, 1)
    b = eval_batches(t5(cfg), 4, 0, 1)
    assert [x["input_ids"].shape[0] for x in a] == [4, 2]
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    halves = [eval_batches(t5(cfg), 4, r, 2)[0] for r in range(2)]
    rows = {
        int(i): lab for h in halves for i, lab in zip(h["sample_ids"], h["labels"], strict=True)
    }
    first = {int(i): lab for x in a for i, lab in zip(x["sample_ids"], x["labels"], strict=True)}
    assert sorted(rows) == list(range(6)) and all(torch.equal(rows[i], first[i]) for i in rows)


def test_t5_needs_enough_sentinels(store):
    cfg = DataConfig(store=store, seq_len=512)
    with pytest.raises(ValueError, match="only 10 sentinels"):
        TrainLoader(t5(cfg, SENTINELS[:10]), 1, 1, 0, 1, seed=0)
    with pytest.raises(ValueError, match="needs a model with eos_token_id"):
        TrainLoader(SpanCorruption(cfg, SpecialIds(eos=None)), 1, 1, 0, 1, seed=0)


def test_decoder_start_token_is_one_source_of_truth(store, tmp_path):
    """A model whose decoder_start_token_id differs from pad_token_id: the training batches, the
    model's own shift, generation and the Hugging Face export all start the decoder with it."""
    import json

    import transformers
    from zeroforge.model import (
        EncDecConfig,
        EncoderDecoder,
        Sampling,
        generate_encdec,
        save_encdec_hf,
    )
    from zeroforge.pipeline import registry

    start = 13  # an ordinary token, neither pad (= EOT) nor a sentinel
    cfg = EncDecConfig(d_model=32, d_ff=48, num_layers=2, num_heads=4, d_kv=8, vocab_size=VOCAB,
                       n_sentinels=100, pad_token_id=PAD, eos_token_id=EOT,
                       decoder_start_token_id=start, relative_attention_num_buckets=8,
                       relative_attention_max_distance=20)
    task = registry.make_task("t5", DataConfig(store=store, seq_len=32), cfg)
    with TrainLoader(task, 2, 1, 0, 1, seed=11) as ld:
        batch = next(ld)
    torch.manual_seed(0)
    model = EncoderDecoder(cfg).eval()
    assert (batch["decoder_input_ids"][:, 0] == start).all()
    assert torch.equal(batch["decoder_input_ids"], model.shift_right(batch["labels"]))

    save_encdec_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["decoder_start_token_id"] == start
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        loss_sum, n_tokens = task.loss_sum(model, batch, "cpu")
        ours = loss_sum / n_tokens
        # HF builds the decoder input from the labels itself, with its config's start token.
        theirs = hf(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    prompt = batch["input_ids"][:1]
    out = hf.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert out[0, 0].item() == start
    assert out[0, 1:].tolist() == generate_encdec(model, prompt.tolist(), 6,
                                                  Sampling(stop_at_eos=False))[0]
