"""Attention within packed documents (``segment_ids``): an example packed with others gives the
logits it gives alone, on the dense SDPA path (CPU) and through FlexAttention's block mask
(the CUDA path, run here on CPU in eager mode: the same mask function, the reference kernel)."""

from __future__ import annotations

import warnings

import pytest
import torch
from zeroforge.model import GPT2, GPT2Config
from zeroforge.model.layers import DocumentMask, flex_attention, segment_positions


@pytest.fixture(scope="module")
def model() -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64,
                           eos_token_id=96)).eval()


def _packed(lengths: list[int], total: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 97, (n,), generator=g) for n in lengths]
    pad = total - sum(lengths)
    ids = torch.cat([*docs, torch.zeros(pad, dtype=torch.long)])[None]  # (1, total)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]
                    + [torch.full((pad,), -1)])[None]  # pads: a segment of their own
    return docs, ids, seg


def test_segment_positions_restart_at_each_document():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [5, 5, 5, 5, 5, 5, 5, 5]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


@pytest.mark.parametrize("flex", [False, True], ids=["sdpa-dense", "flex-block-mask"])
def test_packed_logits_equal_each_example_alone(model, flex):
    if flex and flex_attention is None:
        pytest.skip("this torch has no FlexAttention")
    lengths = [7, 13, 1, 20]
    docs, ids, seg = _packed(lengths, 48)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is the slow path
        if flex:
            mask = DocumentMask(seg, flex=True)
            assert mask.block is not None
            logits = _forward_with(model, ids, seg, mask)
        else:
            logits = model(ids, segment_ids=seg)
        start = 0
        for doc in docs:
            alone = model(doc[None])
            packed = logits[:, start:start + len(doc)]
            assert torch.allclose(packed, alone, atol=1e-5, rtol=0), (packed - alone).abs().max()
            start += len(doc)


def _forward_with(model: GPT2, ids, seg, mask: DocumentMask) -> torch.Tensor:
    """GPT-2's forward with a given DocumentMask (the model builds one by device otherwise)."""
    t = model.transformer
    x = t.wte(ids) + t.wpe(segment_positions(seg))
    for block in t.h:
        x = block(x, mask)
    return model.lm_head(t.ln_f(x))[..., : model.config.total_vocab_size].float()


def test_gradients_do_not_leak_across_documents(model):
    """The loss of document 1 gives no gradient to the embeddings of document 0's tokens."""
    _, ids, seg = _packed([5, 6], 11)
    t = model.transformer
    emb = (t.wte(ids) + t.wpe(segment_positions(seg))).detach().requires_grad_(True)
    mask = DocumentMask(seg, flex=False)
    x = emb
    for block in t.h:
        x = block(x, mask)
    model.lm_head(t.ln_f(x))[0, 5:].sum().backward()
    assert emb.grad[0, :5].abs().max() == 0 and emb.grad[0, 5:].abs().max() > 0


def test_segment_ids_refuse_a_cache_or_padding_mask(model):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, segment_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids))
