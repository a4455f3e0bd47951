"""latent_cross_attention, CUDA C++ backend: every gradient against float64, edges, opcheck.

The kernel tests need a GPU and the built extension (marked gpu + cuda_ext, skipped with the
reason elsewhere). On CPU, the schemas and fake implementations are checked against the Triton
launchers' contract (the backward consumes what the forward saves, whichever backend ran it).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from latentembed.ops.dispatch import select_backend
from latentembed.ops.latent_attention import (
    ATTENTION_BACKENDS,
    latent_cross_attention,
    latent_cross_attention_ref,
)
from latentembed.ops.latent_attention import (
    cuda as lat_cuda,
)
from tests.ops._common import DEVICE, dtype_params
from tests.ops.test_latent_attention import (
    check_against_float64,
    check_frozen_folded_matrices,
    make_inputs,
)

gpu_ext = [pytest.mark.gpu, pytest.mark.cuda_ext]

DTYPES = dtype_params()
# (T, D, H, R): one row and one latent; R and D odd, below and above the 256-thread block (the
# kernels' strided loops); several heads; R above Triton's 512-latent limit.
SHAPES = [
    (1, 3, 1, 1),
    (37, 24, 2, 5),
    (9, 300, 3, 33),
    (70, 64, 2, 16),
    (5, 513, 1, 700),
    (130, 40, 2, 7),
    (6, 40, 1, 1100),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-D{}-H{}-R{}".format(*s))
@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_matches_float64_reference(dtype, shape):
    check_against_float64(make_inputs(*shape, dtype), backend="cuda")


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_nv_embed_v2_scale_bf16():
    # NV-Embed-v2: 8 heads, 512 latents, hidden 4096, ~4.6k pooled rows (16 x 64..512 tokens).
    check_against_float64(make_inputs(4637, 4096, 8, 512, torch.bfloat16), backend="cuda")


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_mixed_parameter_dtypes():
    # fp16 rows with fp32 LayerNorm parameters and folded matrices: gradients in each one's dtype.
    x, w, b, m, u = make_inputs(21, 48, 2, 9, torch.float16)
    _, grads = check_against_float64((x, w, b, m.float(), u.float()), backend="cuda")
    assert [g.dtype for g in grads] == [torch.float16] + [torch.float32] * 4


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_frozen_folded_matrices():
    # m and u need no gradient: the backward skips their GEMMs; the other gradients are unchanged.
    check_frozen_folded_matrices("cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_non_contiguous_and_eps():
    x, w, b, m, u = make_inputs(19, 32, 2, 6, torch.float32)
    x_strided = torch.randn(19, 64, device=DEVICE)[:, ::2].copy_(x)
    m_strided = m.transpose(0, 1).contiguous().transpose(0, 1)
    check_against_float64((x_strided, w, b, m_strided, u), backend="cuda", eps=1e-3)


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_empty_rows():
    x, w, b, m, u = (t.requires_grad_() for t in make_inputs(0, 16, 2, 5, torch.float32))
    y = latent_cross_attention(x, w, b, m, u, backend="cuda")
    assert y.shape == (0, 16)
    (y.sum() * 1.0).backward()
    for t in (x, w, b, m, u):
        assert t.grad is not None and t.grad.shape == t.shape
        assert torch.equal(t.grad, torch.zeros_like(t.grad))


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_is_deterministic_and_ignores_autocast():
    # Fixed-order reductions, no atomics: bitwise equal reruns. Autocast must not reach the
    # ATen GEMMs inside the op (fp32 in, fp32 math).
    inputs = [t.requires_grad_() for t in make_inputs(45, 72, 2, 11, torch.float32)]
    grad_y = torch.randn(45, 72, device=DEVICE)
    runs = []
    for autocast in (False, False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = latent_cross_attention(*inputs, backend="cuda")
        runs.append((y, *torch.autograd.grad(y, inputs, grad_y)))
    for run in runs[1:]:
        assert run[0].dtype == torch.float32
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_compiles_without_graph_break():
    x, w, b, m, u = (t.requires_grad_() for t in make_inputs(13, 32, 2, 5, torch.float32))

    @torch.compile(fullgraph=True)
    def loss_fn(x, w, b, m, u):
        return latent_cross_attention(x * 2.0, w, b, m, u, backend="cuda").square().sum()

    loss = loss_fn(x, w, b, m, u)
    grads = torch.autograd.grad(loss, (x, w, b, m, u))
    leaves = [t.detach().requires_grad_() for t in (x, w, b, m, u)]
    ref = latent_cross_attention_ref(leaves[0] * 2.0, *leaves[1:]).square().sum()
    ref_grads = torch.autograd.grad(ref, leaves)
    torch.testing.assert_close(loss, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_ops_pass_opcheck(dtype):
    ops = torch.ops.latentembed
    x, w, b, m, u = make_inputs(9, 24, 2, 5, dtype)
    torch.library.opcheck(ops.latent_attn_fwd_cuda.default, (x, w, b, m, u, 1e-5))
    y, probs, mean, rstd = ops.latent_attn_fwd_cuda(x, w, b, m, u, 1e-5)
    for need_dm, need_du in ((True, True), (False, False)):
        args = (torch.randn_like(y), x, w, b, m, u, probs, mean, rstd, need_dm, need_du)
        torch.library.opcheck(ops.latent_attn_bwd_cuda.default, args)


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_auto_prefers_triton_and_falls_back_to_cuda_beyond_triton_limits():
    pick = lambda R: (
        select_backend(
            "latent_cross_attention", ATTENTION_BACKENDS, "auto", torch.device("cuda"), torch.bfloat16, R
        ).name
    )
    assert pick(512) == "triton"
    assert pick(1100) == "cuda"


def test_cuda_fakes_follow_the_kernel_contract():
    # Runs on CPU: the fake implementations give the shapes and dtypes the autograd Function
    # and torch.compile rely on (those of the Triton launchers), without the extension.
    x, w, b, m, u = make_inputs(7, 12, 2, 3, torch.float16, device="cpu")
    with FakeTensorMode() as mode:
        fx, fw, fb, fm, fu = (mode.from_tensor(t) for t in (x, w, b, m, u))
        y, probs, mean, rstd = torch.ops.latentembed.latent_attn_fwd_cuda(fx, fw, fb, fm, fu, 1e-5)
        grads = torch.ops.latentembed.latent_attn_bwd_cuda(y, fx, fw, fb, fm, fu, probs, mean, rstd, True, False)
    assert (tuple(y.shape), y.dtype) == ((7, 12), torch.float16)
    assert (tuple(probs.shape), probs.dtype) == ((7, 6), torch.float16)
    assert [(tuple(t.shape), t.dtype) for t in (mean, rstd)] == [((7,), torch.float32)] * 2
    expected = [
        ((7, 12), torch.float16),
        ((12,), torch.float32),
        ((12,), torch.float32),
        ((2, 3, 12), torch.float16),
        ((0,), torch.float16),
    ]
    assert [(tuple(t.shape), t.dtype) for t in grads] == expected
    assert lat_cuda.latent_attn_fwd_cuda.__doc__ and lat_cuda.latent_attn_bwd_cuda.__doc__
