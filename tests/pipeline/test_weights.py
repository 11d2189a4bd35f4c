"""pipeline/weights.py and the prompt handling of pipeline/sample.py, without training runs:
naming checkpoints (run dir / checkpoint root / tag), ``init_from`` an HF directory (vocabulary
re-padding, free fields, refusals), and sentinel markers in encoder-decoder prompts.
Real checkpoints of every kind are loaded in tests/e2e/test_use_results.py."""

from __future__ import annotations

import json

import pytest
import torch
from zeroforge.model import GPT2, EncDecConfig, EncoderDecoder, GPT2Config, save_gpt2_hf
from zeroforge.pipeline.results.weights import init_from, resolve_checkpoint


def _commit(root, step, committed=True):
    tag = root / f"step_{step:08d}"
    tag.mkdir(parents=True)
    if committed:
        (tag / "COMMITTED").write_text(json.dumps({"step": step}))
    return tag


def test_resolve_run_dir_root_and_tag(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _commit(root, 5)
    newest = _commit(root, 10)
    _commit(root, 15, committed=False)  # an interrupted save is never picked
    assert resolve_checkpoint(tmp_path / "run") == newest
    assert resolve_checkpoint(root) == newest
    assert resolve_checkpoint(root / "step_00000005") == root / "step_00000005"


def test_resolve_custom_checkpoint_dir_from_resolved_config(tmp_path):
    elsewhere = tmp_path / "scratch" / "ckpts"
    tag = _commit(elsewhere, 3)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"checkpoint:\n  dir: {elsewhere}\n")
    assert resolve_checkpoint(run) == tag


@pytest.mark.parametrize("case,message", [
    ("missing", "no such checkpoint or run directory"),
    ("empty", "no committed checkpoint"),
    ("partial", "is not committed"),
])
def test_resolve_errors_name_the_path(tmp_path, case, message):
    target = tmp_path / "x"
    if case == "empty":
        target.mkdir()
    elif case == "partial":
        target = _commit(tmp_path / "checkpoints", 7, committed=False)
    with pytest.raises(ValueError, match=message) as e:
        resolve_checkpoint(target)
    assert str(target) in str(e.value)


def _gpt(**kw) -> GPT2:
    torch.manual_seed(0)
    base = dict(n_layer=1, n_head=2, n_embd=16, vocab_size=300, n_positions=32, eos_token_id=299)
    return GPT2(GPT2Config(**{**base, **kw})).eval()


def test_init_from_hf_dir_repads_vocab_and_ignores_dropout(tmp_path):
    src = _gpt()
    save_gpt2_hf(src, tmp_path / "hf")
    dst = _gpt(dropout=0.1, pad_vocab_to_multiple=64, init_std=0.5)  # other init, padding
    assert dst.transformer.wte.weight.shape[0] == 320
    assert "weights from" in init_from(dst, tmp_path / "hf", "gpt2")
    dst.eval()
    ids = torch.randint(0, 300, (2, 9))
    torch.testing.assert_close(dst(ids), src(ids), rtol=0, atol=0)
    assert dst.lm_head.weight is dst.transformer.wte.weight  # still tied


def test_init_from_refuses_other_architecture_and_tokenizer(tmp_path):
    src = _gpt()
    save_gpt2_hf(src, tmp_path / "hf")
    with pytest.raises(ValueError, match=r"init_from: .*model\.n_layer: 1 in .*, 2 here"):
        init_from(_gpt(n_layer=2), tmp_path / "hf", "gpt2")
    (tmp_path / "hf" / "zeroforge_source.json").write_text(json.dumps({"tokenizer": "gpt2"}))
    with pytest.raises(ValueError, match="tokenizer 'gpt2', the token store uses 'cl100k_base'"):
        init_from(_gpt(), tmp_path / "hf", "cl100k_base")
    t5 = EncoderDecoder(EncDecConfig.preset("t5-tiny", vocab_size=300, n_sentinels=4,
                                            pad_token_id=0, eos_token_id=1))
    with pytest.raises(ValueError, match="holds a GPT2Config model"):
        init_from(t5, tmp_path / "hf", "gpt2")
    with pytest.raises(ValueError, match="init_from: .*no such checkpoint"):
        init_from(_gpt(), tmp_path / "nowhere", "gpt2")


def test_encdec_prompt_sentinels_round_trip():
    from zeroforge.data_prep.tokenize import get_encoding
    from zeroforge.pipeline.data.config import DataConfig
    from zeroforge.pipeline.registry import make_task
    from zeroforge.pipeline.results.sample import decode

    enc = get_encoding("gpt2")
    cfg = EncDecConfig.preset("t5-tiny")  # vocab 50257 + 100 sentinels
    span = make_task("t5", DataConfig(), cfg)
    gpt = make_task("gpt", DataConfig(), GPT2Config.preset("gpt2-tiny"))
    ids = span.prompt_ids("To be, or <extra_id_0> to be<extra_id_1>", enc)
    assert ids.count(50257) == 1 and ids[-1] == 50258
    assert decode(ids, enc, cfg) == "To be, or <extra_id_0> to be<extra_id_1>"
    # No marker: sentinel 0 is appended (the model fills in what follows).
    assert span.prompt_ids("Hello", enc) == enc.encode_ordinary("Hello") + [50257]
    # Decoding stops at EOS; GPT prompts are plain text, an empty one starts at EOT.
    assert decode([50257, 40, 50256, 40], enc, cfg) == "<extra_id_0>I"
    assert gpt.prompt_ids("", enc) == [50256]
    assert gpt.prompt_ids("<|endoftext|>", enc) != [50256]
