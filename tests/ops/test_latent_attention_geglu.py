"""geglu_segment_mean: Triton and CUDA kernels against the float64 reference, gradients, edges."""

import pytest
import torch

from latentembed.ops.latent_attention import geglu, geglu_segment_mean, geglu_segment_mean_ref
from tests.ops._common import BF16_ON_GPU, DEVICE, HAS_GPU, KERNEL_BACKENDS, dtype_params
from tests.tolerances import assert_within_budget

# The interpreter rounds to bf16 by truncation, GPUs to nearest: bf16 on the GPU only.
DTYPES = dtype_params(bf16_marks=BF16_ON_GPU)
# Empty sequences first, last and in between; one row; a sequence longer than a row block.
LENGTHS = [[1], [0, 3, 0, 5], [7, 0], [70, 1, 0, 2], [0], [4, 33, 1, 9]]


def packed(lengths, F, dtype, device=DEVICE):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    # Gates over gelu's curved range (|g| up to ~6) and values of both signs.
    a = (2 * torch.randn(int(cu[-1]), 2 * F, device=device)).to(dtype)
    return a, cu.to(device)


def check_forward_and_grad(backend, a, cu):
    a = a.detach().requires_grad_()
    out = geglu_segment_mean(a, cu, backend=backend)
    lowp = geglu_segment_mean_ref(a, cu)
    exact_in = a.detach().double().requires_grad_()
    exact = geglu_segment_mean_ref(exact_in, cu)
    assert_within_budget("forward", out, lowp, exact)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, a, grad_out)
    (grad_lowp,) = torch.autograd.grad(lowp, a, grad_out)
    (grad_exact,) = torch.autograd.grad(exact, exact_in, grad_out.double())
    assert_within_budget("grad a", grad, grad_lowp, grad_exact)
    return out, grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: "lens" + "-".join(map(str, x)))
@pytest.mark.parametrize("F", [1, 13, 200])
def test_matches_float64_reference(backend, dtype, lengths, F):
    a, cu = packed(lengths, F, dtype)
    out, grad = check_forward_and_grad(backend, a, cu)
    for b, n in enumerate(lengths):
        if n == 0:  # zeros, not NaN
            assert torch.equal(out[b], torch.zeros_like(out[b]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_rows(backend):
    # Rows taken from a wider buffer (row stride > 2F): no copy needed, same result.
    a = torch.randn(20, 3, 2 * 24, device=DEVICE)[:, 1, :]
    assert not a.is_contiguous()
    cu = torch.tensor([0, 4, 4, 20], dtype=torch.int32, device=DEVICE)
    check_forward_and_grad(backend, a, cu)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_no_rows(backend):
    a = torch.randn(0, 10, device=DEVICE, requires_grad=True)
    cu = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    out = geglu_segment_mean(a, cu, backend=backend)
    assert torch.equal(out, torch.zeros(2, 5, device=DEVICE))
    out.sum().backward()
    assert a.grad.shape == a.shape


def test_commutes_with_second_linear():
    # The fold the module relies on: mean_t(W2 geglu(a_t) + b2) == W2 mean_t(geglu(a_t)) + b2.
    a, cu = packed([3, 5, 1], 6, torch.float64, "cpu")
    w2, b2 = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    per_row = geglu(a) @ w2.T + b2
    bounds = cu.tolist()
    expected = torch.stack([per_row[s:e].mean(0) for s, e in zip(bounds[:-1], bounds[1:])])
    torch.testing.assert_close(geglu_segment_mean_ref(a, cu) @ w2.T + b2, expected, rtol=1e-12, atol=1e-12)


def test_reference_matches_definition():
    a = torch.randn(5, 4, dtype=torch.float64)
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    v, g = a[:, :2], a[:, 2:]
    act = v * 0.5 * g * (1 + torch.erf(g / 2**0.5))
    expected = torch.stack([act[0:2].mean(0), torch.zeros(2, dtype=torch.float64), act[2:5].mean(0)])
    torch.testing.assert_close(geglu_segment_mean_ref(a, cu), expected, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck_float64():
    a = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda t: geglu_segment_mean_ref(t, cu), (a,))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiles_without_graph_break(backend):
    compile_backend = "inductor" if HAS_GPU else "aot_eager"
    a, cu = packed([4, 0, 6], 8, torch.float32)
    a.requires_grad_()

    @torch.compile(fullgraph=True, backend=compile_backend)
    def loss_fn(a, cu):
        return geglu_segment_mean(a * 2.0, cu, backend=backend).square().sum()

    loss = loss_fn(a, cu)
    (grad,) = torch.autograd.grad(loss, a)
    ref_a = a.detach().requires_grad_()
    ref = geglu_segment_mean_ref(ref_a * 2.0, cu).square().sum()
    (ref_grad,) = torch.autograd.grad(ref, ref_a)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_triton_ops_pass_opcheck():
    from latentembed.ops.latent_attention import triton as lat

    a, cu = packed([3, 0, 5], 7, torch.float32)
    torch.library.opcheck(lat.geglu_segment_mean_fwd_triton, (a, cu))
    torch.library.opcheck(lat.geglu_segment_mean_bwd_triton, (torch.randn(3, 7, device=DEVICE), a, cu))


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_ops_pass_opcheck():
    a, cu = packed([3, 0, 5], 8, torch.bfloat16)
    ops = torch.ops.latentembed
    torch.library.opcheck(ops.geglu_segment_mean_fwd_cuda.default, (a, cu))
    torch.library.opcheck(ops.geglu_segment_mean_bwd_cuda.default, (torch.randn(3, 8, device=DEVICE, dtype=a.dtype), a, cu))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nv_embed_v2_scale(backend, dtype):
    # 16 sequences of 64..512 pooled rows, F = 16384 (the 32768-wide first linear, halved).
    lengths = torch.randint(64, 513, (16,)).tolist()
    check_forward_and_grad(backend, *packed(lengths, 16384, dtype))
