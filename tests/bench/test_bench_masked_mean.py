"""pytest-benchmark timings of masked_mean_pool's CPU path (the reference backend, which auto
picks on CPU).

In the normal test run these execute once as smoke tests (--benchmark-disable in pyproject);
time them with `python -m pytest tests/bench --benchmark-enable`. Speed targets are GPU targets
and live in `python -m latentembed bench`, never in assertions here.
"""

import pytest
import torch

from latentembed import masked_mean_pool

B, L, D = 16, 256, 512


@pytest.fixture
def padded():
    lengths = torch.randint(L // 4, L + 1, (B,))
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return torch.randn(B, L, D, requires_grad=True), mask, lengths


def test_masked_mean_padded_forward(benchmark, padded):
    hidden, mask, _ = padded
    out = benchmark(lambda: masked_mean_pool(hidden.detach(), mask))
    assert out.shape == (B, D)


def test_masked_mean_padded_forward_backward(benchmark, padded):
    hidden, mask, _ = padded
    grad_out = torch.randn(B, D)

    def step():
        return torch.autograd.grad(masked_mean_pool(hidden, mask), hidden, grad_out)[0]

    assert benchmark(step).shape == hidden.shape


def test_masked_mean_packed_forward_backward(benchmark, padded):
    hidden, mask, lengths = padded
    rows = hidden.detach()[mask].requires_grad_()
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    grad_out = torch.randn(B, D)

    def step():
        return torch.autograd.grad(masked_mean_pool(rows, cu_seqlens=cu, validate=False), rows, grad_out)[0]

    assert benchmark(step).shape == rows.shape
