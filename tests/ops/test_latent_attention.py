"""latent_cross_attention and geglu_segment_mean (the latent-attention ops): the Triton and CUDA
kernels against the float64 reference, every gradient, edges, torch.compile and opcheck.

The CUDA backend's own cases are in test_latent_attention_cuda.py, argument errors in
test_latent_attention_errors.py and the sm_90 compile in test_latent_attention_compile.py.
"""

import math

import pytest
import torch

from latentembed.ops.latent_attention import (
    geglu,
    geglu_segment_mean,
    geglu_segment_mean_ref,
    latent_cross_attention,
    latent_cross_attention_ref,
)
from tests.ops._common import BF16_ON_GPU, DEVICE, HAS_GPU, KERNEL_BACKENDS, dtype_params
from tests.tolerances import assert_within_budget

# -- latent_cross_attention ------------------------------------------------------------------------

NAMES = ("x", "ln_weight", "ln_bias", "m", "u")

# tl.dot on bf16 is garbage in the interpreter: bf16 runs on the GPU only.
ATTENTION_DTYPES = dtype_params(bf16_marks=pytest.mark.gpu)
# (T, D, H, R): one row; single and several row blocks; R below, at and above the 16-wide dot
# minimum and not a power of two; D not a multiple of the D chunk; one and several heads.
SHAPES = [(1, 3, 1, 1), (37, 24, 2, 5), (70, 64, 2, 16), (9, 130, 3, 33), (33, 40, 1, 7)]


def make_inputs(T, D, H, R, dtype, device=DEVICE):
    """Hidden states with an offset and uneven scale (LayerNorm has work to do), LayerNorm
    parameters away from 1/0, and folded matrices scaled so that the softmax is far from uniform
    (score std ~ 2) but not one-hot."""
    x = (torch.randn(T, D, device=device) * (0.5 + torch.rand(D, device=device)) + 0.3).to(dtype)
    ln_weight = 1 + 0.2 * torch.randn(D, device=device)
    ln_bias = 0.1 * torch.randn(D, device=device)
    m = (2 * torch.randn(H, R, D, device=device) / math.sqrt(D)).to(dtype)
    u = (torch.randn(H, R, D, device=device) / math.sqrt(H)).to(dtype)
    return x, ln_weight, ln_bias, m, u


def plain_torch(x, ln_weight, ln_bias, m, u, eps):
    """The block as plain PyTorch computes it in x's dtype: every intermediate (LN(x), scores,
    probabilities, attention output) rounded to that dtype, as an eager module in fp16 does.
    Its error against float64 is the budget's "PyTorch's own low-precision error": the kernels,
    like any tensor-core implementation, multiply rounded operands (LN(x), P, dS), which the
    fp32-internal reference never rounds."""
    dt = x.dtype
    xn = torch.nn.functional.layer_norm(x, (x.shape[1],), ln_weight.to(dt), ln_bias.to(dt), eps)
    probs = torch.softmax(torch.einsum("td,hrd->thr", xn, m.to(dt)), dim=-1)
    return x + torch.einsum("thr,hrd->td", probs, u.to(dt))


def check_against_float64(inputs, backend="triton", eps=1e-5):
    """Forward and every gradient under a random upstream gradient, each within its budget."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = latent_cross_attention(*leaves, eps=eps, backend=backend)
    lowp = plain_torch(*leaves, eps)
    exact_leaves = [t.detach().double().requires_grad_() for t in inputs]
    exact = latent_cross_attention_ref(*exact_leaves, eps)
    assert_within_budget("forward", out, lowp, exact)
    grad_y = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_y)
    grads_lowp = torch.autograd.grad(lowp, leaves, grad_y)
    grads_exact = torch.autograd.grad(exact, exact_leaves, grad_y.double())
    for name, g, gl, ge in zip(NAMES, grads, grads_lowp, grads_exact):
        assert_within_budget(f"grad {name}", g, gl, ge)
    return out, grads


def check_frozen_folded_matrices(backend, dtype):
    """Gradients of x and the LayerNorm parameters when m and u need none (the backward then
    skips their GEMMs), against float64 under the error budget."""
    x, w, b, m, u = make_inputs(23, 40, 2, 9, dtype)
    leaves = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_()]
    out = latent_cross_attention(x, w, b, m, u, backend=backend)
    grad_y = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_y)
    exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
    exact = latent_cross_attention_ref(*exact_leaves, m.double(), u.double())
    lowp = plain_torch(*leaves, m, u, 1e-5)
    grads_exact = torch.autograd.grad(exact, exact_leaves, grad_y.double())
    grads_lowp = torch.autograd.grad(lowp, leaves, grad_y)
    for name, g, gl, ge in zip(NAMES, grads, grads_lowp, grads_exact):
        assert_within_budget(f"grad {name}", g, gl, ge)


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-D{}-H{}-R{}".format(*s))
def test_attention_triton_matches_float64_reference(dtype, shape):
    check_against_float64(make_inputs(*shape, dtype))


def test_attention_triton_mixed_parameter_dtypes():
    # fp16 rows with fp32 LayerNorm parameters and fp32 folded matrices (what a module holding
    # fp32 weights passes under half precision): m and u are rounded to x's dtype, gradients
    # come back in each argument's own dtype.
    x, w, b, m, u = make_inputs(21, 48, 2, 9, torch.float16)
    m32, u32 = m.float(), u.float()
    _, grads = check_against_float64((x, w, b, m32, u32))
    assert [g.dtype for g in grads] == [torch.float16, torch.float32, torch.float32, torch.float32, torch.float32]


def test_attention_triton_frozen_folded_matrices():
    # Cached (eval-mode) M and U need no gradient: the backward skips their GEMMs, and the
    # gradients that are needed are unchanged.
    check_frozen_folded_matrices("triton", torch.float32)


def test_attention_triton_non_contiguous_and_eps():
    x, w, b, m, u = make_inputs(19, 32, 2, 6, torch.float32)
    x_strided = torch.randn(19, 64)[:, ::2].copy_(x)
    assert not x_strided.is_contiguous()
    check_against_float64((x_strided, w, b, m.transpose(0, 1).contiguous().transpose(0, 1), u), eps=1e-3)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_attention_empty_rows(backend):
    x, w, b, m, u = (t.requires_grad_() for t in make_inputs(0, 16, 2, 5, torch.float32))
    y = latent_cross_attention(x, w, b, m, u, backend=backend)
    assert y.shape == (0, 16)
    (y.sum() * 1.0).backward()
    for t in (x, w, b, m, u):
        assert t.grad is not None and t.grad.shape == t.shape
        assert torch.equal(t.grad, torch.zeros_like(t.grad))


def test_attention_reference_matches_unfolded_attention():
    # The folded spec equals per-head attention with explicit queries, keys and values.
    T, D, H, R, dh = 6, 10, 2, 4, 3
    x = torch.randn(T, D, dtype=torch.float64)
    w, b = 1 + 0.1 * torch.randn(D, dtype=torch.float64), 0.1 * torch.randn(D, dtype=torch.float64)
    wq = torch.randn(H, dh, D, dtype=torch.float64)
    k = torch.randn(H, R, dh, dtype=torch.float64)
    v = torch.randn(H, R, dh, dtype=torch.float64)
    wo = torch.randn(D, H, dh, dtype=torch.float64)
    xn = torch.nn.functional.layer_norm(x, (D,), w, b, 1e-5)
    expected = x.clone()
    for h in range(H):
        q = xn @ wq[h].T
        p = torch.softmax(q @ k[h].T / math.sqrt(dh), dim=-1)
        expected += (p @ v[h]) @ wo[:, h].T
    m = torch.einsum("hrd,hde->hre", k, wq) / math.sqrt(dh)
    u = torch.einsum("hrd,ehd->hre", v, wo)
    torch.testing.assert_close(latent_cross_attention_ref(x, w, b, m, u), expected, rtol=1e-12, atol=1e-12)


def test_attention_reference_gradcheck_float64():
    inputs = [t.double().requires_grad_() for t in make_inputs(4, 6, 2, 3, torch.float64, "cpu")]
    assert torch.autograd.gradcheck(latent_cross_attention_ref, inputs)


def test_attention_autocast_does_not_change_the_result():
    # Autocast is ignored: the op computes in x's dtype with fp32 internals either way.
    inputs = make_inputs(11, 24, 2, 5, torch.float32)
    plain = latent_cross_attention(*inputs)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        cast = latent_cross_attention(*inputs)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_attention_compiles_without_graph_break(backend):
    compile_backend = "inductor" if HAS_GPU else "aot_eager"
    x, w, b, m, u = (t.requires_grad_() for t in make_inputs(13, 32, 2, 5, torch.float32))

    @torch.compile(fullgraph=True, backend=compile_backend)
    def loss_fn(x, w, b, m, u):
        return latent_cross_attention(x * 2.0, w, b, m, u, backend=backend).square().sum()

    loss = loss_fn(x, w, b, m, u)
    grads = torch.autograd.grad(loss, (x, w, b, m, u))

    def reference(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, b, m, u)]
        value = latent_cross_attention_ref(leaves[0] * 2.0, *leaves[1:]).square().sum()
        return value, torch.autograd.grad(value, leaves)

    (ref, ref_grads), (exact, exact_grads) = reference(torch.float32), reference(torch.float64)
    assert_within_budget("loss", loss, ref, exact)
    for name, g, rg, eg in zip("xwbmu", grads, ref_grads, exact_grads):
        assert_within_budget(f"grad {name}", g, rg, eg)


def test_attention_triton_ops_pass_opcheck():
    from latentembed.ops.latent_attention import triton as lat

    x, w, b, m, u = make_inputs(9, 24, 2, 5, torch.float32)
    torch.library.opcheck(lat.latent_attn_fwd_triton, (x, w, b, m, u, 1e-5))
    y, probs, mean, rstd = lat.latent_attn_fwd_triton(x, w, b, m, u, 1e-5)
    for need_dm, need_du in ((True, True), (False, False)):
        args = (torch.randn_like(y), x, w, b, m, u, probs, mean, rstd, need_dm, need_du)
        torch.library.opcheck(lat.latent_attn_bwd_triton, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_nv_embed_v2_scale(dtype):
    # NV-Embed-v2: 8 heads, 512 latents, hidden 4096, ~4.6k pooled rows (16 x 64..512 tokens).
    check_against_float64(make_inputs(4637, 4096, 8, 512, dtype))


# -- geglu_segment_mean ----------------------------------------------------------------------------

# The interpreter rounds to bf16 by truncation, GPUs to nearest: bf16 on the GPU only.
GEGLU_DTYPES = dtype_params(bf16_marks=BF16_ON_GPU)
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
@pytest.mark.parametrize("dtype", GEGLU_DTYPES)
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: "lens" + "-".join(map(str, x)))
@pytest.mark.parametrize("F", [1, 13, 200])
def test_geglu_matches_float64_reference(backend, dtype, lengths, F):
    a, cu = packed(lengths, F, dtype)
    out, grad = check_forward_and_grad(backend, a, cu)
    for b, n in enumerate(lengths):
        if n == 0:  # zeros, not NaN
            assert torch.equal(out[b], torch.zeros_like(out[b]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_geglu_non_contiguous_rows(backend):
    # Rows taken from a wider buffer (row stride > 2F): no copy needed, same result.
    a = torch.randn(20, 3, 2 * 24, device=DEVICE)[:, 1, :]
    assert not a.is_contiguous()
    cu = torch.tensor([0, 4, 4, 20], dtype=torch.int32, device=DEVICE)
    check_forward_and_grad(backend, a, cu)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_geglu_no_rows(backend):
    a = torch.randn(0, 10, device=DEVICE, requires_grad=True)
    cu = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    out = geglu_segment_mean(a, cu, backend=backend)
    assert torch.equal(out, torch.zeros(2, 5, device=DEVICE))
    out.sum().backward()
    assert a.grad.shape == a.shape


def test_geglu_commutes_with_second_linear():
    # The fold the module relies on: mean_t(W2 geglu(a_t) + b2) == W2 mean_t(geglu(a_t)) + b2.
    a, cu = packed([3, 5, 1], 6, torch.float64, "cpu")
    w2, b2 = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    per_row = geglu(a) @ w2.T + b2
    bounds = cu.tolist()
    expected = torch.stack([per_row[s:e].mean(0) for s, e in zip(bounds[:-1], bounds[1:])])
    torch.testing.assert_close(geglu_segment_mean_ref(a, cu) @ w2.T + b2, expected, rtol=1e-12, atol=1e-12)


def test_geglu_reference_matches_definition():
    a = torch.randn(5, 4, dtype=torch.float64)
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    v, g = a[:, :2], a[:, 2:]
    act = v * 0.5 * g * (1 + torch.erf(g / 2**0.5))
    expected = torch.stack([act[0:2].mean(0), torch.zeros(2, dtype=torch.float64), act[2:5].mean(0)])
    torch.testing.assert_close(geglu_segment_mean_ref(a, cu), expected, rtol=1e-12, atol=1e-12)


def test_geglu_reference_gradcheck_float64():
    a = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda t: geglu_segment_mean_ref(t, cu), (a,))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_geglu_compiles_without_graph_break(backend):
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


def test_geglu_triton_ops_pass_opcheck():
    from latentembed.ops.latent_attention import triton as lat

    a, cu = packed([3, 0, 5], 7, torch.float32)
    torch.library.opcheck(lat.geglu_segment_mean_fwd_triton, (a, cu))
    torch.library.opcheck(lat.geglu_segment_mean_bwd_triton, (torch.randn(3, 7, device=DEVICE), a, cu))


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_geglu_cuda_ops_pass_opcheck():
    a, cu = packed([3, 0, 5], 8, torch.bfloat16)
    ops = torch.ops.latentembed
    torch.library.opcheck(ops.geglu_segment_mean_fwd_cuda.default, (a, cu))
    torch.library.opcheck(
        ops.geglu_segment_mean_bwd_cuda.default, (torch.randn(3, 8, device=DEVICE, dtype=a.dtype), a, cu)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_geglu_nv_embed_v2_scale(backend, dtype):
    # 16 sequences of 64..512 pooled rows, F = 16384 (the 32768-wide first linear, halved).
    lengths = torch.randint(64, 513, (16,)).tolist()
    check_forward_and_grad(backend, *packed(lengths, 16384, dtype))
