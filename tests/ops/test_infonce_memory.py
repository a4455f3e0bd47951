"""Memory of the Triton InfoNCE backward: the plan (ops/infonce/plan.py) at the target shape, the
no-overwrite rule of its one-pass layout, and what a run actually allocates against the plan.

The target (docs/gpu.md): B = 4096 queries, N = 16384 documents, D = 4096, bf16, extra memory
well under 200 MiB, gradients included. On CPU the allocations of a scaled-down run are
recorded with a TorchDispatchMode (every aten op's fresh output storages: their sum bounds the
peak from above), so the plan is checked against the code that allocates, not against itself.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from latentembed.ops.infonce import CandidateRule, infonce_lse
from latentembed.ops.infonce.plan import backward_plan
from tests.ops.infonce_helpers import DEVICE, HAS_GPU

MIB = 2**20


def test_target_shape_extra_memory_is_well_under_200_mib():
    from latentembed.ops.infonce import triton as tri

    B, N, D = 4096, 16384, 4096
    plan = backward_plan(B, N, D, torch.bfloat16)
    assert plan.one_pass and plan.dd_rows == 1024
    groups = -(-N // tri._group_docs(B, N, torch.device("cpu"), sms=132))
    extra = plan.extra_bytes(B, D, 2, groups) / MIB
    # dd 128 + one dd block past it 8 + dq 32 + dscale partials 0.27: no fp32 [B, D] accumulator.
    assert 168 <= extra < 169, extra
    assert plan.dq_accumulator_elements == 0 and plan.ds_elements == 0


@pytest.mark.parametrize("seed", range(5))
def test_one_pass_layout_never_overwrites_an_unread_ds_row(seed):
    # dd block [a, b) is written (elements [a*D, b*D)) while dS^T rows [a, N) are still to be
    # read (elements [dst_offset + a*B, dst_offset + N*B)): the two ranges must be disjoint, for
    # every block, and the buffer must hold both matrices.
    g = torch.Generator().manual_seed(seed)
    for _ in range(200):
        D = int(torch.randint(1, 300, (1,), generator=g))
        B = int(torch.randint(1, D + 1, (1,), generator=g))
        N = int(torch.randint(1, 500, (1,), generator=g))
        chunk = int(torch.randint(1, N + 1, (1,), generator=g))
        plan = backward_plan(B, N, D, torch.float16, one_pass=True, chunk=chunk)
        assert plan.buffer_elements >= max(N * D, plan.dst_offset + N * B)
        for a in range(0, N, plan.dd_rows):
            b = min(N, a + plan.dd_rows)
            assert b * D <= plan.dst_offset + a * B, (B, N, D, chunk, a, b)
        # Never more than one block of room beyond dd itself.
        assert plan.buffer_elements - N * D <= plan.dd_rows * max(B, D)


def test_one_pass_needs_b_at_most_d():
    assert not backward_plan(5000, 100, 4096, torch.bfloat16).one_pass
    with pytest.raises(ValueError, match="B <= D"):
        backward_plan(5000, 100, 4096, torch.bfloat16, one_pass=True)


class _Allocations(TorchDispatchMode):
    """Bytes of every storage an aten op creates while active (storages seen before excluded)."""

    def __init__(self, known):
        super().__init__()
        self.seen = {t.untyped_storage().data_ptr() for t in known}
        self.sizes = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.seen:
                    self.seen.add(ptr)
                    self.sizes.append(t.untyped_storage().nbytes())
        return out


@pytest.mark.skipif(HAS_GPU, reason="CPU allocation accounting (the GPU run reports the measured peak)")
@pytest.mark.parametrize("plan_name", ["one-pass", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_allocates_what_the_plan_says(monkeypatch, plan_name, dtype):
    from latentembed.ops.infonce import triton as tri

    monkeypatch.setattr(tri, "GROUP_DOCS", 16)
    monkeypatch.setattr(tri, "CHUNK_DOCS", 24)
    monkeypatch.setattr(tri, "ONE_PASS", plan_name == "one-pass")
    B, N, D = 20, 70, 48  # B <= D: both plans apply
    q, d = torch.randn(B, D, dtype=dtype), torch.randn(N, D, dtype=dtype)
    scale = torch.tensor(2.0)
    rule = CandidateRule(pos_index=torch.randint(0, N, (B,)))
    lse, _ = infonce_lse(q, d, scale, backend="triton", **rule._asdict())
    grad = torch.randn(B)
    known = [q, d, scale, lse, grad, rule.pos_index]
    allocations = _Allocations(known)
    accumulate = tri._accumulate_mm

    def accumulate_unrecorded(acc, a, b):
        # On CPU the fp32 accumulation of a 16-bit chunk upcasts its operands first (transient
        # copies, freed before the next chunk); on the GPU cuBLAS takes them as they are.
        allocations.paused = True
        try:
            accumulate(acc, a, b)
        finally:
            allocations.paused = False

    monkeypatch.setattr(tri, "_accumulate_mm", accumulate_unrecorded)
    with allocations:
        grad_q, grad_d, _ = tri.backward(grad, q, d, scale, lse, rule, subtract_positive=False)
    plan = backward_plan(B, N, D, dtype, one_pass=plan_name == "one-pass", chunk=24)
    groups = -(-plan.chunk // tri._group_docs(B, plan.chunk, q.device))
    planned = plan.extra_bytes(B, D, q.element_size(), groups)
    total = sum(allocations.sizes)
    # Everything else is scalars (the float64 dscale sum, the scale in fp32): a few bytes each.
    assert planned <= total <= planned + 256, (planned, total, allocations.sizes)
    assert grad_q.shape == (B, D) and grad_d.shape == (N, D)
    assert grad_q.dtype == dtype and grad_d.dtype == dtype


@pytest.mark.gpu
def test_target_shape_measured_peak_on_gpu():
    # The plan's 168.25 MiB (bf16, gradients included) against the allocator's peak; the forward's
    # partials and the returned lse add KiBs.
    B, N, D = 4096, 16384, 4096
    q = torch.randn(B, D, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    d = torch.randn(N, D, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    pos = torch.arange(B, device=DEVICE)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lse, _ = infonce_lse(q, d, 50.0, pos_index=pos, backend="triton", validate=False)
    torch.autograd.grad(lse.sum(), (q, d))
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / MIB
    assert peak < 170, peak
