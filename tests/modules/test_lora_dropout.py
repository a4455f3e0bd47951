"""LoRA dropout regenerated from a seed: equal to the reference dropout with the same mask
(forward and every gradient), no mask or dropped copy kept for the backward, and the same
masks under checkpointing and GradCache's replay of the random state."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from latentembed.modules.contrastive import InfoNCELoss
from latentembed.modules.grad_cache import grad_cache_step
from latentembed.modules.lora import MultiLoRALinear, lora_routing
from latentembed.modules.lora_dropout import (
    draw_seed,
    dropout_keep_mask,
    multi_lora_add_with_dropout,
    seeded_dropout,
)
from latentembed.ops.multi_lora import group_by_adapter, multi_lora_linear_add_ref

from .multi_lora_helpers import backend_params, random_layer

LAYOUTS = {
    "mixed": [1, -1, 0, 1, 0, 2, 2, -1, 1],
    "one-adapter": [2] * 7,
    "base-and-one": [-1, -1, 0, 0, 0],
    "all-base": [-1, -1, -1],
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("p", [0.1, 0.6])
def test_equals_reference_dropout_with_the_same_mask(backend, layout, p):
    dtype = torch.float64 if backend == "reference" else torch.float32
    index = torch.tensor(LAYOUTS[layout])
    n, d_in, d_out, t, r = index.shape[0], 19, 13, 3, 4
    x = torch.randn(n, d_in, dtype=dtype, requires_grad=True)
    base = torch.randn(n, d_out, dtype=dtype, requires_grad=True)
    a = torch.randn(t, r, d_in, dtype=dtype, requires_grad=True)
    b = torch.randn(t, d_out, r, dtype=dtype, requires_grad=True)
    scaling = torch.tensor([0.5, 2.0, 1.25])
    seed = draw_seed()
    out = multi_lora_add_with_dropout(
        base, x, a, b, scaling, group_by_adapter(index, t), p=p, seed=seed, backend=backend
    )
    keep = dropout_keep_mask(x.shape, p, seed, x.device)
    exact = multi_lora_linear_add_ref(base, x * keep * (1.0 / (1 - p)), a, b, scaling, index)
    # The 1 / (1 - p) is applied to the [N, r] activations instead of x: equal to rounding.
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, exact, **tol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (base, x, a, b), grad)
    want = torch.autograd.grad(exact, (base, x, a, b), grad)
    for name, g, w in zip(("base_out", "x", "lora_a", "lora_b"), got, want):
        torch.testing.assert_close(g, w, msg=name, **tol)


def test_mask_is_a_function_of_the_seed_with_the_right_rate():
    cpu = torch.device("cpu")
    shape = torch.Size([300, 1001])
    for p in (0.1, 0.5, 0.9):
        keep = dropout_keep_mask(shape, p, 123, cpu)
        rate, n = keep.float().mean().item(), keep.numel()
        sigma = ((1 - p) * p / n) ** 0.5
        assert abs(rate - (1 - p)) < 5 * sigma, (p, rate)
    assert torch.equal(dropout_keep_mask(shape, 0.3, 5, cpu), dropout_keep_mask(shape, 0.3, 5, cpu))
    assert not torch.equal(dropout_keep_mask(shape, 0.3, 5, cpu), dropout_keep_mask(shape, 0.3, 6, cpu))
    x = torch.randn(4, 33)
    dropped = seeded_dropout(x, 0.25, 9)
    keep = dropout_keep_mask(x.shape, 0.25, 9, cpu)
    assert torch.equal(dropped, x * keep * (1 / 0.75))  # F.dropout's arithmetic


def _saved_during(fn) -> list:
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("tasks", [[0, 0, 0], [0, 1, -1]], ids=["one-adapter", "mixed"])
def test_keeps_no_mask_and_no_dropped_copy(tasks):
    layer = random_layer(dropout=0.3).train()
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    with lora_routing(layer, tasks):
        saved, out = _saved_during(lambda: layer(x))
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    big = [t for t in saved if t.numel() >= x.numel() and t.untyped_storage().data_ptr() not in params]
    assert not any(t.dtype == torch.bool for t in saved)
    # The only input-sized tensor kept is x itself (its storage), not a dropped copy.
    assert big and all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in big)
    out.sum().backward()
    assert x.grad is not None and layer.lora_a.grad is not None


class _Block(nn.Module):
    def __init__(self, p=0.4):
        super().__init__()
        self.one = MultiLoRALinear(nn.Linear(12, 12), ["a", "b"], rank=3, dropout=p)
        self.two = MultiLoRALinear(nn.Linear(12, 6), ["a", "b"], rank=2, dropout=p, routing=self.one.routing)
        for layer in (self.one, self.two):
            with torch.no_grad():
                layer.lora_b.normal_()

    def forward(self, x):
        return self.two(torch.tanh(self.one(x)))


def _grads(module) -> list:
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


def test_checkpoint_recompute_draws_the_same_masks():
    block = _Block().double().train()
    x = torch.randn(6, 12, dtype=torch.float64)
    grad = torch.randn(6, 6, dtype=torch.float64)
    with lora_routing(block.one, ["a", "b", "b", "a", "base", "a"]):
        torch.manual_seed(3)
        block(x).backward(grad)
        plain = _grads(block)
        block.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        checkpoint(block, x, use_reentrant=False).backward(grad)
        ckpt = _grads(block)
        block.zero_grad(set_to_none=True)
        torch.manual_seed(4)
        block(x).backward(grad)
        other = _grads(block)
    assert len(plain) == len(ckpt) == 4
    for g, w in zip(ckpt, plain):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(other[0], plain[0])  # dropout is live


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 12)
        self.block = _Block()

    def forward(self, input_ids):
        with lora_routing(self.block.one, ["a"] * input_ids.shape[0]):
            return self.block(self.embed(input_ids).mean(1))


def test_grad_cache_replays_the_masks():
    enc = _Encoder().double().train()
    q, d = torch.randint(0, 40, (4, 5)), torch.randint(0, 40, (8, 5))
    loss_fn = InfoNCELoss(0.05)
    chunk = 3
    torch.manual_seed(11)
    qe = torch.cat([enc(c) for c in q.split(chunk)])
    de = torch.cat([enc(c) for c in d.split(chunk)])
    expected = loss_fn(qe, de)
    expected.backward()
    want = _grads(enc)
    enc.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    loss = grad_cache_step(enc, q, d, loss_fn, chunk)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    for g, w in zip(_grads(enc), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_bad_probability_raises():
    x, base = torch.randn(2, 4), torch.randn(2, 3)
    a, b = torch.randn(1, 2, 4), torch.randn(1, 3, 2)
    g = group_by_adapter(torch.tensor([0, 0]), 1)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\), got 1.0"):
        multi_lora_add_with_dropout(base, x, a, b, torch.ones(1), g, p=1.0, seed=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got -0.1"):
        MultiLoRALinear(nn.Linear(4, 3), 1, rank=2, dropout=-0.1)
