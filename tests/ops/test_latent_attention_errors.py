"""Bad input to the latent-attention ops: clear errors; backend selection."""

import pytest
import torch

from latentembed.ops.dispatch import BackendUnavailableError
from latentembed.ops.latent_attention import (
    ATTENTION_BACKENDS,
    GEGLU_BACKENDS,
    geglu_segment_mean,
    latent_cross_attention,
)

D = 8
X = torch.randn(5, D)
W, B = torch.ones(D), torch.zeros(D)
M = torch.randn(2, 3, D)
A = torch.randn(6, 10)


def cu(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


def attn(**overrides):
    args = dict(x=X, ln_weight=W, ln_bias=B, m=M, u=M)
    args.update(overrides)
    return latent_cross_attention(**args)


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        (dict(x=torch.randn(5)), ValueError, r"x must have 2 dims \[T, D\].*got shape \(5,\)"),
        (dict(x=X.long()), TypeError, r"x must have dtype in \[.*\], got int64"),
        (dict(x=[1.0]), TypeError, r"x must be a torch.Tensor, got list"),
        (dict(x=torch.randn(5, 0), ln_weight=W[:0], ln_bias=B[:0], m=M[..., :0], u=M[..., :0]), ValueError, r"D >= 1"),
        (
            dict(ln_weight=torch.ones(D + 1)),
            ValueError,
            r"ln_weight must have shape \[D\] = \(8,\) to match x \(5, 8\), got \(9,\)",
        ),
        (dict(ln_bias=torch.zeros(1, D)), ValueError, r"ln_bias must have shape \[D\]"),
        (dict(ln_weight=W.to("meta")), ValueError, r"ln_weight must be on the same device as x \(cpu\), got meta"),
        (dict(m=torch.randn(3, D)), ValueError, r"m must have 3 dims \[H, R, D\]"),
        (dict(m=torch.randn(2, 3, D + 2)), ValueError, r"m must have shape \[H, R, D\] with D = 8 .* got \(2, 3, 10\)"),
        (
            dict(u=torch.randn(2, 4, D)),
            ValueError,
            r"m and u must have the same shape .* m \(2, 3, 8\) and u \(2, 4, 8\)",
        ),
        (dict(m=torch.randn(2, 0, D), u=torch.randn(2, 0, D)), ValueError, r"H >= 1 heads and R >= 1 latents"),
        (dict(u=M.int()), TypeError, r"u must have dtype in"),
        (dict(u=M.to("meta")), ValueError, r"u must be on the same device as x"),
    ],
    ids=lambda v: None,
)
def test_attention_bad_input(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        attn(**overrides)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (
            dict(a=torch.randn(6, 9), cu_seqlens=cu(0, 6)),
            ValueError,
            r"a must have an even number 2F >= 2 of columns.*\(6, 9\)",
        ),
        (dict(a=torch.randn(6, 0), cu_seqlens=cu(0, 6)), ValueError, r"even number 2F >= 2"),
        (dict(a=torch.randn(2, 3, 4), cu_seqlens=cu(0, 2)), ValueError, r"a must have 2 dims \[T, 2F\]"),
        (dict(a=A.long(), cu_seqlens=cu(0, 6)), TypeError, r"a must have dtype in"),
        (dict(a=A, cu_seqlens=cu(0, 6, dtype=torch.int64)), TypeError, r"cu_seqlens must have dtype int32, got int64"),
        (dict(a=A, cu_seqlens=cu(0)), ValueError, r"cu_seqlens must have shape \[B\+1\]"),
        (dict(a=A, cu_seqlens=cu(1, 6)), ValueError, r"cu_seqlens must start at 0"),
        (
            dict(a=A, cu_seqlens=cu(0, 2, 5)),
            ValueError,
            r"end at the number of rows of a \(6\), got cu_seqlens\[-1\] = 5",
        ),
        (dict(a=A, cu_seqlens=cu(0, 4, 2, 6)), ValueError, r"non-decreasing"),
        (dict(a=A, cu_seqlens=cu(0, 6).to("meta")), ValueError, r"cu_seqlens must be on the same device as a"),
        (dict(a=A, cu_seqlens=[0, 6]), TypeError, r"cu_seqlens must be a torch.Tensor, got list"),
        (dict(a=A, cu_seqlens=cu(0, 6), backend="fastest"), ValueError, r"backend must be one of"),
    ],
    ids=lambda v: None,
)
def test_geglu_bad_input(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        geglu_segment_mean(**kwargs)


def test_geglu_validate_false_skips_only_value_checks():
    assert geglu_segment_mean(A, cu(0, 2, 6), validate=False).shape == (2, 5)
    with pytest.raises(TypeError, match="int32"):
        geglu_segment_mean(A, cu(0, 6, dtype=torch.int64), validate=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choices")
def test_auto_on_cpu_is_reference_and_cuda_is_refused():
    # auto never picks the (slow) Triton interpreter on CPU; cuda explains why it cannot run.
    assert torch.equal(attn(), attn(backend="reference"))
    with pytest.raises(BackendUnavailableError, match=r"cuda: runs on \['cuda'\], got device 'cpu'"):
        geglu_segment_mean(A, cu(0, 6), backend="cuda")
    with pytest.raises(
        BackendUnavailableError,
        match=r"latent_cross_attention: no backend .*\n  cuda: runs on \['cuda'\], got device 'cpu'",
    ):
        attn(backend="cuda")


def test_triton_refuses_too_many_latents_and_float64():
    with pytest.raises(BackendUnavailableError, match=r"at most 512 latents \(R\), got R = 513"):
        attn(m=torch.randn(1, 513, D), u=torch.randn(1, 513, D), backend="triton")
    with pytest.raises(BackendUnavailableError, match=r"triton: supports dtypes .* got float64"):
        attn(x=X.double(), backend="triton")


def test_backend_lists():
    assert [b.name for b in ATTENTION_BACKENDS] == ["triton", "cuda", "reference"]
    assert [b.name for b in GEGLU_BACKENDS] == ["cuda", "triton", "reference"]
