"""masked_mean_pool: kernels against the float64 reference, gradients, layouts and bad input."""

import pytest
import torch

from latentembed import masked_mean_pool, masked_mean_pool_ref
from latentembed.ops.masked_mean import MaskedMeanFunction
from tests.ops._common import BF16_ON_GPU, DEVICE, HAS_GPU, KERNEL_BACKENDS, dtype_params
from tests.tolerances import assert_within_budget

# The interpreter converts to bf16 by truncation, not round-to-nearest as GPUs do, so its bf16
# results are off by up to one ulp: tested on the GPU only.
DTYPES = dtype_params(bf16_marks=BF16_ON_GPU)
PADDED_SHAPES = [(1, 1, 1), (2, 3, 3), (3, 17, 127), (2, 5, 4097), (1, 1000, 8), (5, 64, 96)]
PACKED_LENGTHS = [[1], [0, 3, 0, 5], [7, 0], [300, 1, 0, 2], [0], [40, 33, 1, 64, 9]]


def shape_id(shape):
    return "B{}-L{}-D{}".format(*shape)


def random_mask(B: int, L: int, device=DEVICE) -> torch.Tensor:
    """Random keep-mask with, where B allows, one row with nothing kept and one with everything."""
    mask = torch.rand(B, L, device=device) < 0.6
    if B >= 2:
        mask[0] = False
        mask[-1] = True
    return mask


def packed(lengths, D, dtype, device=DEVICE):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    hidden = torch.randn(int(cu[-1]), D, dtype=dtype, device=device)
    return hidden, cu.to(device)


def check_forward_and_grad(backend, hidden, mask=None, cu_seqlens=None):
    """Forward and the gradient under a random upstream gradient, each within its error budget."""
    hidden = hidden.detach().requires_grad_()
    out = masked_mean_pool(hidden, mask, cu_seqlens=cu_seqlens, backend=backend)
    lowp = masked_mean_pool_ref(hidden, mask, cu_seqlens)
    exact_in = hidden.detach().double().requires_grad_()
    exact = masked_mean_pool_ref(exact_in, mask, cu_seqlens)
    assert_within_budget("forward", out, lowp, exact)

    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, hidden, grad_out)
    (grad_lowp,) = torch.autograd.grad(lowp, hidden, grad_out)
    (grad_exact,) = torch.autograd.grad(exact, exact_in, grad_out.double())
    assert_within_budget("grad hidden", grad, grad_lowp, grad_exact)
    return out, grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PADDED_SHAPES, ids=shape_id)
def test_padded_matches_reference(backend, dtype, shape):
    B, L, D = shape
    hidden = torch.randn(B, L, D, dtype=dtype, device=DEVICE)
    out, grad = check_forward_and_grad(backend, hidden, random_mask(B, L))
    if B >= 2:  # the row with nothing kept: zeros, not NaN, and zero gradient
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert torch.equal(grad[0], torch.zeros_like(grad[0]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", PACKED_LENGTHS, ids=lambda x: "lens" + "-".join(map(str, x)))
@pytest.mark.parametrize("D", [1, 127, 4097])
def test_packed_matches_reference(backend, dtype, lengths, D):
    hidden, cu = packed(lengths, D, dtype)
    out, _ = check_forward_and_grad(backend, hidden, cu_seqlens=cu)
    for b, n in enumerate(lengths):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64])
def test_integer_masks_and_no_mask(backend, mask_dtype):
    hidden = torch.randn(4, 19, 40, device=DEVICE)
    mask = random_mask(4, 19)
    out = masked_mean_pool(hidden, mask.to(mask_dtype), backend=backend)
    assert torch.equal(out, masked_mean_pool(hidden, mask, backend=backend))
    # Values other than 0/1 still mean "keep" (nonzero), as for HF attention masks.
    scaled = masked_mean_pool(hidden, mask.to(mask_dtype) * 3, backend=backend)
    assert torch.equal(scaled, out)
    check_forward_and_grad(backend, hidden, None)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_inputs(backend):
    # hidden [B, L, D] as a transposed view, strided feature dim, mask as a column slice.
    base = torch.randn(33, 6, 2 * 50, device=DEVICE)
    hidden = base.transpose(0, 1)[:, :, ::2]
    mask = random_mask(6, 66)[:, ::2]
    assert not hidden.is_contiguous() and not mask.is_contiguous()
    check_forward_and_grad(backend, hidden, mask)
    # packed rows from a wider buffer
    rows = torch.randn(20, 2, 31, device=DEVICE)[:, 1, :]
    cu = torch.tensor([0, 4, 4, 20], dtype=torch.int32, device=DEVICE)
    check_forward_and_grad(backend, rows, cu_seqlens=cu)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_padded_and_packed_agree(backend):
    lengths = [5, 1, 12, 0]
    L, D = 12, 24
    hidden = torch.randn(len(lengths), L, D, device=DEVICE)
    mask = torch.arange(L, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    flat = hidden[mask]
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    padded_out = masked_mean_pool(hidden, mask, backend=backend)
    packed_out = masked_mean_pool(flat, cu_seqlens=cu, backend=backend)
    torch.testing.assert_close(padded_out, packed_out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_empty_rows_everywhere(backend):
    # L = 0 padded and T = 0 packed: every sequence is empty, output zeros, gradient shape kept.
    hidden = torch.randn(3, 0, 7, device=DEVICE, requires_grad=True)
    out = masked_mean_pool(hidden, torch.zeros(3, 0, dtype=torch.bool, device=DEVICE), backend=backend)
    assert torch.equal(out, torch.zeros(3, 7, device=DEVICE))
    out.sum().backward()
    assert hidden.grad.shape == hidden.shape
    rows = torch.randn(0, 7, device=DEVICE)
    cu = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    assert torch.equal(masked_mean_pool(rows, cu_seqlens=cu, backend=backend), torch.zeros(2, 7, device=DEVICE))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_reference_gradcheck_float64(layout):
    if layout == "padded":
        hidden = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
        args = (random_mask(3, 6, "cpu"), None)
    else:
        hidden = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
        args = (None, torch.tensor([0, 4, 4, 9], dtype=torch.int32))
    assert torch.autograd.gradcheck(lambda h: masked_mean_pool_ref(h, *args), (hidden,))


def test_reference_matches_definition():
    # The spec, spelled out with Python loops, on values where float64 is exact.
    hidden = torch.randint(-8, 8, (3, 4, 2)).double()
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    out = masked_mean_pool_ref(hidden, mask)
    for b in range(3):
        kept = [hidden[b, t] for t in range(4) if mask[b, t]]
        expected = sum(kept) / len(kept) if kept else torch.zeros(2, dtype=torch.float64)
        assert torch.equal(out[b], expected)


def test_output_dtype_follows_input_and_auto_backend():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        hidden = torch.randn(2, 3, 4, dtype=dtype, device=DEVICE)
        assert masked_mean_pool(hidden).dtype == dtype


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_compiles_without_graph_break(backend, layout):
    # fullgraph=True fails on any graph break (the packed layout also checks that the value checks
    # of cu_seqlens, which read values, are skipped while compiling). On CPU aot_eager traces
    # through dynamo and AOT autograd without generating C++; on the GPU inductor compiles.
    compile_backend = "inductor" if HAS_GPU else "aot_eager"
    if layout == "padded":
        hidden = torch.randn(3, 10, 16, device=DEVICE, requires_grad=True)
        mask, cu = random_mask(3, 10), None
    else:
        hidden, cu = packed([4, 0, 6], 16, torch.float32)
        hidden.requires_grad_()
        mask = None

    @torch.compile(fullgraph=True, backend=compile_backend)
    def pooled_norm(h, m, c):
        return masked_mean_pool(h * 2.0, m, cu_seqlens=c, backend=backend).square().sum()

    loss = pooled_norm(hidden, mask, cu)
    (grad,) = torch.autograd.grad(loss, hidden)
    ref_hidden = hidden.detach().requires_grad_()
    ref = masked_mean_pool_ref(ref_hidden * 2.0, mask, cu).square().sum()
    (ref_grad,) = torch.autograd.grad(ref, ref_hidden)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


def _op_samples(device):
    hidden = torch.randn(3, 7, 20, device=device)
    mask = random_mask(3, 7, device)
    rows, cu = packed([3, 0, 4], 20, torch.float32, device)
    return [(hidden, mask, None), (hidden, None, None), (rows, None, cu)]


def test_triton_ops_pass_opcheck():
    from latentembed.ops.masked_mean.triton import masked_mean_bwd_triton, masked_mean_fwd_triton

    for hidden, mask, cu in _op_samples(DEVICE):
        torch.library.opcheck(masked_mean_fwd_triton, (hidden, mask, cu))
        grad_out = torch.randn(cu.shape[0] - 1 if cu is not None else hidden.shape[0], 20, device=DEVICE)
        length = hidden.shape[0] if cu is not None else hidden.shape[1]
        torch.library.opcheck(masked_mean_bwd_triton, (grad_out, mask, cu, length))


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_ops_pass_opcheck():
    import latentembed.ops.masked_mean.cuda  # noqa: F401  (defines the schemas)
    from latentembed._extension import load_extension

    load_extension()
    for hidden, mask, cu in _op_samples("cuda"):
        torch.library.opcheck(torch.ops.latentembed.masked_mean_fwd_cuda.default, (hidden, mask, cu))
        grad_out = torch.randn(cu.shape[0] - 1 if cu is not None else hidden.shape[0], 20, device="cuda")
        length = hidden.shape[0] if cu is not None else hidden.shape[1]
        torch.library.opcheck(torch.ops.latentembed.masked_mean_bwd_cuda.default, (grad_out, mask, cu, length))


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_triton_at_benchmark_scale(dtype):
    # The shape the benchmark times, so the timed kernels are the tested ones.
    B, L, D = 64, 512, 4096
    hidden = torch.randn(B, L, D, dtype=dtype, device="cuda")
    lengths = torch.randint(L // 4, L + 1, (B,), device="cuda")
    mask = torch.arange(L, device="cuda")[None, :] < lengths[:, None]
    check_forward_and_grad("cuda", hidden, mask)
    check_forward_and_grad("triton", hidden, mask)


def test_function_can_be_applied_directly():
    # The autograd Function takes a kernel backend's name, for code that composes ops itself.
    hidden = torch.randn(2, 4, 3, device=DEVICE, requires_grad=True)
    mask = random_mask(2, 4)
    out = MaskedMeanFunction.apply(hidden, mask, None, "triton")
    torch.testing.assert_close(out, masked_mean_pool_ref(hidden, mask), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_dropped_rows_never_leak(backend):
    # NaN and inf in masked-out positions (e.g. garbage in padding) must not reach the output
    # or the gradient of kept rows.
    hidden = torch.randn(3, 9, 10, device=DEVICE)
    mask = random_mask(3, 9)
    poisoned = hidden.clone()
    poisoned[~mask] = float("nan")
    poisoned[~mask & (torch.arange(9, device=DEVICE) % 2 == 0)] = float("inf")
    poisoned.requires_grad_()
    out = masked_mean_pool(poisoned, mask, backend=backend)
    torch.testing.assert_close(out, masked_mean_pool_ref(hidden, mask), rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(out, poisoned, torch.randn_like(out))
    assert torch.isfinite(grad).all()


OUT_DTYPE_INPUTS = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16", marks=BF16_ON_GPU)]


@pytest.mark.parametrize("dtype", OUT_DTYPE_INPUTS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_float32_out_dtype_is_the_unrounded_mean_and_keeps_the_gradient_dtype(dtype, layout):
    # The float32 mean of half rows, rounded once to float32 (not to half), without a float32
    # copy of hidden; hidden's gradient stays in hidden's dtype.
    if layout == "padded":
        hidden, mask, cu = torch.randn(3, 37, 65, dtype=dtype, device=DEVICE), random_mask(3, 37), None
    else:
        (hidden, cu), mask = packed([5, 0, 31, 2], 65, dtype), None
    hidden = hidden.detach().requires_grad_()
    out = masked_mean_pool(hidden, mask, cu_seqlens=cu, backend="triton", out_dtype=torch.float32)
    exact_in = hidden.detach().double().requires_grad_()
    exact = masked_mean_pool_ref(exact_in, mask, cu)
    lowp = masked_mean_pool_ref(hidden, mask, cu, torch.float32)
    assert out.dtype == torch.float32
    assert_within_budget("forward", out, lowp, exact)
    # Far more accurate than the half-precision result would be.
    assert (out.double() - exact).abs().max() < 1e-5 * max(1.0, exact.abs().max().item())
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, hidden, grad_out)
    (grad_lowp,) = torch.autograd.grad(lowp, hidden, grad_out)
    (grad_exact,) = torch.autograd.grad(exact, exact_in, grad_out.double())
    assert grad.dtype == dtype
    assert_within_budget("grad hidden", grad, grad_lowp, grad_exact)


def test_out_dtype_errors_and_backend_choice():
    hidden = torch.randn(2, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="out_dtype must hold hidden's dtype"):
        masked_mean_pool(hidden, backend="reference", out_dtype=torch.float16)
    with pytest.raises(TypeError, match="out_dtype must be a floating torch.dtype or None, got torch.int32"):
        masked_mean_pool(hidden, backend="reference", out_dtype=torch.int32)
    from latentembed.ops.masked_mean import BACKENDS

    cuda = next(b for b in BACKENDS if b.name == "cuda")
    reason = cuda.supports(out_dtype=torch.float32, hidden_dtype=torch.bfloat16)
    assert "out_dtype" in reason
    assert cuda.supports(out_dtype=None, hidden_dtype=torch.bfloat16) is None
    assert masked_mean_pool(hidden.half(), backend="reference", out_dtype=torch.float32).dtype == torch.float32


def test_triton_out_dtype_ops_pass_opcheck():
    from latentembed.ops.masked_mean.triton import masked_mean_bwd_triton, masked_mean_fwd_triton

    hidden, cu = packed([3, 0, 4], 16, torch.float16)
    torch.library.opcheck(masked_mean_fwd_triton, (hidden, None, cu), {"out_dtype": torch.float32})
    grad = torch.randn(3, 16, device=DEVICE)
    torch.library.opcheck(masked_mean_bwd_triton, (grad, None, cu, 7), {"grad_dtype": torch.float16})
