"""multi_lora_linear_add: a row sees only its own adapter, even when another adapter is NaN/inf.

A dense product over all adapters multiplies the other adapters' weights by zeros, and
0 * NaN = NaN; these tests poison one adapter and check that nothing else moves, forward and
every gradient, for each backend.
"""

import pytest
import torch

from latentembed.ops.multi_lora import group_by_adapter, multi_lora_linear_add
from tests.ops._common import DEVICE

BAD = 1  # the poisoned adapter


def _run(backend, base, x, a, b, scaling, index, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in (base, x, a, b)]
    out = multi_lora_linear_add(*inputs, scaling, group_by_adapter(index, a.shape[0]), backend=backend)
    return out, torch.autograd.grad(out, inputs, grad_out)


def _case(n=37, d_in=24, d_out=40, rank=4, num_adapters=3):
    index = torch.randint(-1, num_adapters, (n,), device=DEVICE)
    if n > num_adapters:  # every adapter (and the base) has rows, in random places
        index[: num_adapters + 1] = torch.arange(-1, num_adapters, device=DEVICE)
        index = index[torch.randperm(n, device=DEVICE)]
    x = torch.randn(n, d_in, device=DEVICE)
    base = torch.randn(n, d_out, device=DEVICE)
    a = torch.randn(num_adapters, rank, d_in, device=DEVICE) / d_in**0.5
    b = torch.randn(num_adapters, d_out, rank, device=DEVICE) / rank**0.5
    scaling = torch.rand(num_adapters, device=DEVICE) + 0.5
    return base, x, a, b, scaling, index


# The interpreter's numpy matmul warns about the inf * 0 it is asked to compute in adapter 1's rows.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("weight", ["lora_a", "lora_b"])
def test_nonfinite_adapter_stays_in_its_rows(backend, poison, weight):
    base, x, a, b, scaling, index = _case()
    bad_a, bad_b = a.clone(), b.clone()
    target = bad_a if weight == "lora_a" else bad_b
    where = tuple(int(torch.randint(0, s, ())) for s in target.shape[1:])
    target[(BAD, *where)] = poison
    grad_out = torch.randn(base.shape, device=DEVICE)
    out_clean, grads_clean = _run(backend, base, x, a, b, scaling, index, grad_out)
    out_bad, grads_bad = _run(backend, base, x, bad_a, bad_b, scaling, index, grad_out)

    others = index != BAD
    # The poison shows where it belongs: every row of the bad adapter has a non-finite output.
    assert (~torch.isfinite(out_bad[~others])).any(dim=1).all(), "adapter 1's rows must see its NaN/inf"
    exact = dict(rtol=0, atol=0)  # nothing of adapter 1 enters these numbers: bitwise equal
    torch.testing.assert_close(out_bad[others], out_clean[others], **exact, msg="forward of other rows")
    names = ("base_out", "x", "lora_a", "lora_b")
    torch.testing.assert_close(grads_bad[0], grads_clean[0], **exact, msg="grad base_out")
    torch.testing.assert_close(grads_bad[1][others], grads_clean[1][others], **exact, msg="grad x of other rows")
    for name, g_bad, g_clean in zip(names[2:], grads_bad[2:], grads_clean[2:]):
        keep = torch.arange(g_bad.shape[0], device=DEVICE) != BAD
        assert torch.isfinite(g_bad[keep]).all(), f"grad {name}: other adapters got a non-finite gradient"
        torch.testing.assert_close(g_bad[keep], g_clean[keep], **exact, msg=f"grad {name} of other adapters")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_issue_example_base_row_and_adapter0_rows_stay_finite(backend):
    # The issue's case: A[1] is NaN, the batch routes [0, -1, 0] (adapter 1 has no rows at all).
    base, x, a, b, scaling, _ = _case(n=3)
    a[BAD] = float("nan")
    index = torch.tensor([0, -1, 0], device=DEVICE)
    out, grads = _run(backend, base, x, a, b, scaling, index, torch.randn(base.shape, device=DEVICE))
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], base[1]), "the base-only row must be base_out exactly"
    for name, g in zip(("base_out", "x", "lora_b"), (grads[0], grads[1], grads[3])):
        assert torch.isfinite(g).all(), f"grad {name} is not finite"
    assert torch.isfinite(grads[2][0]).all() and torch.equal(grads[2][2], torch.zeros_like(grads[2][2]))
