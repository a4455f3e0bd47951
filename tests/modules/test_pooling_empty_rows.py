"""A sequence with nothing to pool, in every pooling mode that can normalise it: its output is
zero and it sends exactly zero gradient back, in fp16, bf16 and fp32, with half weights and
under autocast, whatever gradient arrives for it (F.normalize's ``g / 1e-12`` at a zero row
overflowed fp16 and turned the W2 weight gradient into NaN)."""

import pytest
import torch

from latentembed.modules.latent_attention import LatentAttentionPooling
from latentembed.modules.latent_attention_unfolded import UnfoldedLatentAttentionPooling
from latentembed.modules.pooling import pool

from .test_latent_attention_pooling import BACKENDS

CFG = dict(hidden_size=40, num_latents=5, num_heads=2, dim_head=12, ff_mult=2)
D = CFG["hidden_size"]
# (parameter dtype, autocast dtype or None, hidden dtype)
PRECISIONS = [
    pytest.param(torch.float32, None, torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, None, torch.bfloat16, id="bf16-weights"),
    pytest.param(torch.float16, None, torch.float16, id="fp16-weights"),
    pytest.param(torch.float32, torch.bfloat16, torch.float32, id="bf16-autocast"),
    pytest.param(torch.float32, torch.float16, torch.float32, id="fp16-autocast"),
    pytest.param(torch.float32, torch.float16, torch.float16, id="fp16-autocast-fp16-hidden"),
]


def _batch(L: int, dtype: torch.dtype, empty: int):
    """Hidden [4, L, D] (scale 3) and a pool mask whose row ``empty`` pools nothing and whose
    other rows pool at least one position."""
    hidden = 3 * torch.randn(4, L, D, dtype=dtype)
    mask = torch.rand(4, L) < 0.6
    mask[:, torch.randint(0, L, (1,))] = True
    mask[empty] = False
    return hidden, mask


def _run(module, hidden, mask, grad_out, autocast, packed):
    """Output and the gradients of hidden and of every parameter, by name."""
    hidden = hidden.detach().requires_grad_()
    kw = {}
    if packed:  # the same tokens packed, every position of a sequence in it, the mask on [T]
        B, L = mask.shape
        kw["cu_seqlens"] = torch.arange(B + 1, dtype=torch.int32) * L
        x, m = hidden.reshape(B * L, -1), mask.reshape(-1)
    else:
        x, m = hidden, mask
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = module(x, m, **kw)
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad(out, (hidden, *params), grad_out.to(out.dtype), allow_unused=True)
    return out, dict(zip(("hidden", *names), grads))


def _assert_same_as_without_the_empty_row(module, param_dtype, autocast, hidden_dtype, packed, normalize_grad_inf):
    empty = int(torch.randint(0, 4, ()))
    hidden, mask = _batch(7, hidden_dtype, empty)
    grad_out = torch.randn(4, D)
    if normalize_grad_inf:  # what F.normalize of the zero row downstream sends back in fp16
        grad_out[empty] = float("inf")
    keep = [b for b in range(4) if b != empty]
    module.to(param_dtype)
    out, grads = _run(module, hidden, mask, grad_out, autocast, packed)
    out3, grads3 = _run(module, hidden[keep], mask[keep], grad_out[keep], autocast, packed)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.equal(grads["hidden"][empty], torch.zeros_like(grads["hidden"][empty]))
    # The batch without the row runs GEMMs of another height, which may round differently:
    # allow a few units in the last place of the compute dtype, relative to the largest entry.
    eps = torch.finfo(autocast or param_dtype).eps
    pairs = [("pooled", out[keep], out3), ("grad hidden", grads["hidden"][keep], grads3["hidden"])]
    pairs += [(f"grad {n}", g, grads3[n]) for n, g in grads.items() if n != "hidden"]
    for name, value, expected in pairs:
        if value is None:
            assert expected is None, name
            continue
        assert torch.isfinite(value).all(), f"{name}: {int((~torch.isfinite(value)).sum())} non-finite entries"
        atol = 8 * eps * expected.abs().max().item()
        torch.testing.assert_close(value, expected, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("param_dtype, autocast, hidden_dtype", PRECISIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_latent_attention_empty_row_zero_output_zero_gradient(backend, param_dtype, autocast, hidden_dtype, packed):
    module = LatentAttentionPooling(**CFG, normalize=True, backend=backend)
    _assert_same_as_without_the_empty_row(module, param_dtype, autocast, hidden_dtype, packed, False)


@pytest.mark.parametrize("param_dtype, autocast, hidden_dtype", PRECISIONS)
def test_latent_attention_ignores_any_gradient_sent_to_an_empty_row(param_dtype, autocast, hidden_dtype):
    """Unnormalised pooling followed by a normalisation elsewhere (EmbeddingModel's): even an
    infinite gradient for the empty row must not reach the parameters."""
    module = LatentAttentionPooling(**CFG, normalize=False)
    _assert_same_as_without_the_empty_row(module, param_dtype, autocast, hidden_dtype, False, True)


@pytest.mark.parametrize("param_dtype, autocast, hidden_dtype", PRECISIONS[:3])
def test_reference_block_empty_row_zero_gradient(param_dtype, autocast, hidden_dtype):
    module = UnfoldedLatentAttentionPooling(**CFG, normalize=True)
    _assert_same_as_without_the_empty_row(module, param_dtype, autocast, hidden_dtype, False, False)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["mean", "last", "first", "weighted_mean"])
def test_pool_modes_normalised_empty_row_zero_gradient(mode, dtype, packed):
    empty = int(torch.randint(0, 4, ()))
    hidden, mask = _batch(6, dtype, empty)
    grad_out = torch.randn(4, D, dtype=dtype)
    keep = [b for b in range(4) if b != empty]

    def run(h, m):
        h = h.detach().requires_grad_()
        kw = {}
        x = h
        if packed:
            B, L = m.shape
            kw["cu_seqlens"] = torch.arange(B + 1, dtype=torch.int32) * L
            x, m = h.reshape(B * L, -1), m.reshape(-1)
        out = pool(x, m, mode=mode, normalize=True, **kw)
        return out, torch.autograd.grad(out, h, grad_out[: out.shape[0]] if h.shape[0] == 4 else grad_out[keep])[0]

    out, g = run(hidden, mask)
    out3, g3 = run(hidden[keep], mask[keep])
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    torch.testing.assert_close(out[keep], out3, rtol=0, atol=0)
    assert torch.equal(g[empty], torch.zeros_like(g[empty]))
    torch.testing.assert_close(g[keep], g3, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_l2_normalize_zero_row_zero_output_and_gradient(dtype):
    from latentembed.modules.pooling_functions import l2_normalize

    x = torch.randn(5, 33, dtype=dtype)
    x[2] = 0
    x.requires_grad_()
    out = l2_normalize(x)
    expected = torch.nn.functional.normalize(x.detach().to(torch.promote_types(dtype, torch.float32)), dim=-1)
    assert out.dtype == dtype
    assert torch.equal(out, expected.to(dtype))  # F.normalize's rounding on every row
    grad = torch.randn(5, 33, dtype=dtype)
    grad[2] = float("inf") if dtype != torch.float64 else 1e300
    (gx,) = torch.autograd.grad(out, x, grad)
    assert torch.equal(gx[2], torch.zeros_like(gx[2]))
    assert torch.isfinite(gx).all()
