"""Packed attention without a varlen kernel: one SDPA call per sequence over the packed rows
equals the fp32 reference with the block-diagonal mask, forward and gradients."""

import pytest
import torch

from latentembed.modules.attention import (
    AttentionInputs,
    attend,
    dense_packed_mask,
    host_seqlens,
    packed_runs_lean,
)


def _packed(lengths, heads=6, kv_heads=2, d=16, dtype=torch.float64):
    T = sum(lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    q = torch.randn(T, heads, d, dtype=dtype, requires_grad=True)
    k = torch.randn(T, kv_heads, d, dtype=dtype, requires_grad=True)
    v = torch.randn(T, kv_heads, d, dtype=dtype, requires_grad=True)
    return q, k, v, cu


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize(
    "lengths", [[9, 1, 4, 0, 7, 3], [5], [0, 3, 0], [33, 2]], ids=["mixed-empty", "one", "empties", "long-short"]
)
@pytest.mark.parametrize("kv_heads", [2, 6], ids=["gqa", "mha"])
def test_per_sequence_sdpa_equals_reference_with_gradients(causal, lengths, kv_heads):
    q, k, v, cu = _packed(lengths, kv_heads=kv_heads)
    T = q.shape[0]
    lean = AttentionInputs("sdpa", causal, cu_seqlens=cu, seqlens=host_seqlens(cu))
    ref = AttentionInputs("math", causal, dense_mask=dense_packed_mask(cu, T, causal), cu_seqlens=cu)
    out, exact = attend(q, k, v, lean), attend(q, k, v, ref)
    assert out.shape == (T, q.shape[1], q.shape[2])
    torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(exact, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_per_sequence_sdpa_fp32_within_rounding():
    q, k, v, cu = _packed([17, 5, 30], dtype=torch.float32)
    lean = AttentionInputs("sdpa", True, cu_seqlens=cu, seqlens=host_seqlens(cu))
    exact = attend(
        q.double(),
        k.double(),
        v.double(),
        AttentionInputs("math", True, dense_mask=dense_packed_mask(cu, q.shape[0], True), cu_seqlens=cu),
    )
    torch.testing.assert_close(attend(q, k, v, lean).double(), exact, rtol=1e-5, atol=1e-6)


def test_packed_sdpa_without_lengths_uses_the_block_mask():
    """An AttentionInputs built by hand (no seqlens) still attends within sequences only."""
    q, k, v, cu = _packed([4, 6])
    T = q.shape[0]
    out = attend(q, k, v, AttentionInputs("sdpa", False, cu_seqlens=cu))
    exact = attend(q, k, v, AttentionInputs("math", False, dense_mask=dense_packed_mask(cu, T, False), cu_seqlens=cu))
    torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-10)


def test_packed_runs_lean_everywhere_but_math():
    cpu = torch.device("cpu")
    assert packed_runs_lean("auto", cpu, torch.float32)
    assert packed_runs_lean("sdpa", cpu, torch.bfloat16)
    assert not packed_runs_lean("math", cpu, torch.float32)
    assert not packed_runs_lean("varlen", cpu, torch.bfloat16)  # cannot run here at all
