"""Padded positions of the decoder's input never influence real tokens: not their outputs, not
any gradient, whatever the padding holds (NaN, inf, huge values, out-of-range token ids, wild
position ids), for left and right padding, causal and bidirectional attention, each attention
backend that runs on CPU, padded and internally unpadded."""

import pytest
import torch

from .decoder_helpers import random_batch
from .test_decoder_inputs import tiny

LENGTHS = [5, 1, 7, 3]
VOCAB = 128
POISONS = {
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": float("-inf"),
    "huge": 3e38,
}


def _run(model, mask, grad_out, *, embeds=None, ids=None, position_ids=None, **kw):
    """Output and the gradients of the embeddings (when given) and of every parameter."""
    model.zero_grad(set_to_none=True)
    if embeds is not None:
        embeds = embeds.detach().requires_grad_()
    out = model(ids, mask, inputs_embeds=embeds, position_ids=position_ids, **kw).last_hidden_state
    out.backward(grad_out)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out.detach(), (embeds.grad if embeds is not None else None), grads


def _assert_identical(got, want, mask):
    out, g_x, grads = got
    out0, g_x0, grads0 = want
    assert torch.equal(out[mask], out0[mask])
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    if g_x is not None:
        assert torch.equal(g_x[mask], g_x0[mask])
        assert torch.equal(g_x[~mask], torch.zeros_like(g_x[~mask]))
    for name, g in grads.items():
        assert (g is None) == (grads0[name] is None), name
        if g is not None:
            assert torch.isfinite(g).all(), f"{name}: non-finite gradient"
            assert torch.equal(g, grads0[name]), name


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpadded"])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_padding_embeddings_never_reach_real_tokens(left, causal, backend, unpad):
    model = tiny().train()
    _, mask = random_batch(LENGTHS, left=left)
    x = torch.randn(*mask.shape, 64)
    grad_out = torch.randn_like(x)
    kw = dict(causal=causal, attn_backend=backend, unpad=unpad)
    base = _run(model, mask, grad_out, embeds=x, **kw)
    for value in POISONS.values():
        poisoned = torch.where(mask[..., None], x, value)
        _assert_identical(_run(model, mask, grad_out, embeds=poisoned, **kw), base, mask)
    other = torch.where(mask[..., None], x, 100 * torch.randn_like(x))
    _assert_identical(_run(model, mask, grad_out, embeds=other, **kw), base, mask)


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpadded"])
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_padding_token_and_position_ids_are_ignored(left, unpad):
    """Padding ids outside the vocabulary (-1, -100, vocab_size + 5) are not looked up, and the
    position ids of padding slots do not matter."""
    model = tiny().train()
    ids, mask = random_batch(LENGTHS, left=left)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    grad_out = torch.randn(*mask.shape, 64)
    kw = dict(attn_backend="sdpa", unpad=unpad)
    base = _run(model, mask, grad_out, ids=torch.where(mask, ids, 0), position_ids=positions, **kw)
    for pad_id in (-1, -100, VOCAB + 5):
        wild = torch.where(mask, positions, torch.randint(-(10**9), 10**9, mask.shape))
        got = _run(model, mask, grad_out, ids=torch.where(mask, ids, pad_id), position_ids=wild, **kw)
        _assert_identical(got, base, mask)
