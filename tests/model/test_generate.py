from __future__ import annotations

import pytest
import torch
import transformers
from zeroforge.model import (
    GPT2,
    EncDecConfig,
    EncoderDecoder,
    GPT2Config,
    Sampling,
    generate_encdec,
    generate_gpt2,
    save_encdec_hf,
    save_gpt2_hf,
)

PROMPTS = [[5, 17, 33, 2, 8, 41, 9], [60], [7, 7, 90, 12]]


@pytest.fixture
def gpt2(gpt2_cfg: GPT2Config) -> GPT2:
    # A larger init std makes the random model's greedy continuations non-trivial.
    cfg = GPT2Config.from_dict({**gpt2_cfg.to_dict(), "init_std": 0.3})
    return GPT2(cfg).eval()


@pytest.fixture
def t5(t5_cfg: EncDecConfig) -> EncoderDecoder:
    return EncoderDecoder(t5_cfg).eval()


def test_gpt2_cache_matches_recompute(gpt2: GPT2) -> None:
    cached = generate_gpt2(gpt2, PROMPTS, 20, Sampling(stop_at_eos=False))
    full = generate_gpt2(gpt2, PROMPTS, 20, Sampling(stop_at_eos=False, use_cache=False))
    assert cached == full
    assert all(len(o) == 20 for o in cached)
    assert len({t for o in cached for t in o}) > 5  # not a degenerate repetition


def test_gpt2_cached_logits_match_full_forward(gpt2: GPT2) -> None:
    x = torch.randint(0, 97, (2, 12))
    full = gpt2(x)
    cache = gpt2.new_cache()
    step = [gpt2(x[:, :5], cache=cache)]
    for t in range(5, 12):
        step.append(gpt2(x[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(step, dim=1), full, atol=1e-5, rtol=1e-5)


def test_gpt2_batch_equals_one_by_one(gpt2: GPT2) -> None:
    batched = generate_gpt2(gpt2, PROMPTS, 15, Sampling(stop_at_eos=False))
    single = [generate_gpt2(gpt2, [p], 15, Sampling(stop_at_eos=False))[0] for p in PROMPTS]
    assert batched == single


def test_gpt2_left_padding_positions(gpt2: GPT2) -> None:
    # The left-padded row must produce exactly the logits of the unpadded prompt.
    ids = torch.tensor([[0, 0, 0, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    torch.testing.assert_close(gpt2(ids, attention_mask=mask)[:, 3:], gpt2(ids[:, 3:]),
                               atol=1e-5, rtol=1e-5)


def test_gpt2_greedy_matches_transformers(tmp_path, gpt2: GPT2) -> None:  # noqa: ANN001
    save_gpt2_hf(gpt2, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    for p in PROMPTS:
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        assert out[0, len(p):].tolist() == generate_gpt2(gpt2, [p], 12, Sampling(stop_at_eos=False))[0]


def test_gpt2_stops_at_eos(gpt2: GPT2) -> None:
    free = generate_gpt2(gpt2, PROMPTS, 12, Sampling(stop_at_eos=False))
    eos = free[0][3]  # force an early stop for prompt 0
    out = generate_gpt2(gpt2, PROMPTS, 12, Sampling(eos_id=eos))
    assert out[0] == free[0][: free[0].index(eos) + 1]
    for o, f in zip(out, free, strict=True):
        assert o == (f[: f.index(eos) + 1] if eos in f else f)


def test_sampling_top_k1_is_greedy_and_seeded(gpt2: GPT2) -> None:
    greedy = generate_gpt2(gpt2, PROMPTS, 10, Sampling(stop_at_eos=False))
    assert generate_gpt2(gpt2, PROMPTS, 10, Sampling(stop_at_eos=False, do_sample=True, top_k=1, temperature=1.7, seed=3)) == greedy
    a = generate_gpt2(gpt2, PROMPTS, 10, Sampling(stop_at_eos=False, do_sample=True, top_p=0.9, seed=123))
    b = generate_gpt2(gpt2, PROMPTS, 10, Sampling(stop_at_eos=False, do_sample=True, top_p=0.9, seed=123))
    c = generate_gpt2(gpt2, PROMPTS, 10, Sampling(stop_at_eos=False, do_sample=True, top_p=0.9, seed=124))
    assert a == b and a != c
    tiny_p = generate_gpt2(gpt2, PROMPTS, 10, Sampling(stop_at_eos=False, do_sample=True, top_p=1e-6, seed=5))
    assert tiny_p == greedy  # top_p keeps at least the most likely token


def test_invalid_arguments(gpt2: GPT2) -> None:
    with pytest.raises(ValueError, match="top_p"):
        generate_gpt2(gpt2, PROMPTS, 3, Sampling(do_sample=True, top_p=1.5))
    with pytest.raises(ValueError, match="n_positions"):
        generate_gpt2(gpt2, PROMPTS, 64)


def test_gpt2_fills_the_whole_context(gpt2: GPT2) -> None:
    # The last sampled token is never fed back: a prompt of L tokens can get n_positions - L + 1
    # new ones, and the cached and recomputed paths (whose longest input is then exactly
    # n_positions) agree.
    n = gpt2.config.n_positions
    prompt = [list(range(1, 11))]
    cached = generate_gpt2(gpt2, prompt, n - 10 + 1, Sampling(stop_at_eos=False))
    full = generate_gpt2(gpt2, prompt, n - 10 + 1, Sampling(stop_at_eos=False, use_cache=False))
    assert cached == full and len(cached[0]) == n - 10 + 1
    with pytest.raises(ValueError, match="n_positions"):
        generate_gpt2(gpt2, prompt, n - 10 + 2)


def test_t5_cache_matches_recompute_and_batch(t5: EncoderDecoder) -> None:
    cached = generate_encdec(t5, PROMPTS, 15, Sampling(stop_at_eos=False))
    assert cached == generate_encdec(t5, PROMPTS, 15, Sampling(stop_at_eos=False, use_cache=False))
    assert cached == [generate_encdec(t5, [p], 15, Sampling(stop_at_eos=False))[0] for p in PROMPTS]
    assert len({t for o in cached for t in o}) > 5


def test_t5_greedy_matches_transformers(tmp_path, t5_cfg: EncDecConfig) -> None:  # noqa: ANN001
    # Symmetric depth: HF's generation cache sizes itself from num_layers (encoder depth).
    t5 = EncoderDecoder(EncDecConfig.from_dict({**t5_cfg.to_dict(), "num_decoder_layers": 2}))
    save_encdec_hf(t5, tmp_path)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    src = torch.tensor([PROMPTS[0], PROMPTS[2] + [0, 0, 0]])
    mask = (torch.arange(7)[None] < torch.tensor([[7], [4]])).long()
    out = hf.generate(input_ids=src, attention_mask=mask, max_new_tokens=10, do_sample=False,
                      eos_token_id=None)
    ours = generate_encdec(t5, [PROMPTS[0], PROMPTS[2]], 10, Sampling(stop_at_eos=False))
    assert out[:, 1:].tolist() == ours  # HF output starts with decoder_start_token_id


def test_t5_stops_at_eos(t5: EncoderDecoder) -> None:
    free = generate_encdec(t5, PROMPTS, 12, Sampling(stop_at_eos=False))
    eos = free[1][2]
    out = generate_encdec(t5, PROMPTS, 12, Sampling(eos_id=eos))
    for o, f in zip(out, free, strict=True):
        assert o == (f[: f.index(eos) + 1] if eos in f else f)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_stop_ends_each_sequence_where_it_says(family: str, gpt2: GPT2, t5: EncoderDecoder
                                               ) -> None:
    model, generate = (gpt2, generate_gpt2) if family == "gpt2" else (t5, generate_encdec)
    free = generate(model, PROMPTS, 12, Sampling(stop_at_eos=False))
    # Stop a sequence once it has emitted the 4th token it would have emitted unstopped.
    marks = [row[3] for row in free]
    calls: list[int] = []

    def stop(tokens: list[int]) -> bool:
        calls.append(len(tokens))
        return marks[[r[:len(tokens)] for r in free].index(tokens)] in tokens

    stopped = generate(model, PROMPTS, 12, Sampling(stop_at_eos=False, stop=stop))
    for row, full, mark in zip(stopped, free, marks, strict=True):
        assert row == full[:full.index(mark) + 1]  # the tokens so far, the stop token included
    assert max(calls) <= max(len(r) for r in stopped)  # generation ended when all had stopped
