"""Fused ops of NV-Embed's latent-attention pooling block, on packed pooled rows.

* :func:`latent_cross_attention`: ``y = x + sum_h softmax(LN(x) M_h^T) U_h`` with the folded
  per-head matrices ``M_h = K_h Wq_h / sqrt(dim_head)`` and ``U_h = V_h Wo_h^T`` [R, D].
* :func:`geglu_segment_mean`: per-sequence mean of ``v * gelu(g)`` over the rows of the
  feed-forward's first linear output ``a = [v, g]`` (the second linear commutes with the mean).

Backends: ``reference`` (plain PyTorch, the spec), ``triton`` and ``cuda`` (the compiled
extension), all for both ops. For latent_cross_attention ``auto`` prefers ``triton`` on CUDA: it
normalises x inside the score GEMM, while the CUDA backend writes LN(x) once for cuBLAS (and
again in the backward); ``cuda`` comes next (it also takes R > 512 latents) and can be asked for.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import checks
from ..dispatch import cuda_backend, reference_backend, select_backend, triton_backend
from . import cuda
from .reference import geglu, geglu_segment_mean_ref, latent_cross_attention_ref

__all__ = [
    "latent_cross_attention",
    "geglu_segment_mean",
    "latent_cross_attention_ref",
    "geglu_segment_mean_ref",
    "geglu",
    "LatentCrossAttentionFunction",
    "GegluSegmentMeanFunction",
    "BACKENDS",
    "ATTENTION_BACKENDS",
    "GEGLU_BACKENDS",
]

# The Triton attention kernel holds a row block's scores for all R latents of a head at once;
# above 512 no autotune config fits in the H100's 227 KiB of shared memory (checked by
# tests/ops/compile_latent_attention_sm90.py), so larger R goes to the CUDA backend.
MAX_TRITON_LATENTS = 512


def _triton_attention_supports(num_latents: int) -> Optional[str]:
    if num_latents > MAX_TRITON_LATENTS:
        return f"supports at most {MAX_TRITON_LATENTS} latents (R), got R = {num_latents}"
    return None


_REFERENCE = reference_backend()

# Triton first: it fuses the LayerNorm into the score GEMM; the CUDA backend runs its GEMMs in
# cuBLAS around memory-bound kernels (see csrc/latent_attention/latent_cross_attention_host.cpp).
ATTENTION_BACKENDS = (
    triton_backend(supports=_triton_attention_supports),
    cuda_backend(),
    _REFERENCE,
)

GEGLU_BACKENDS = (
    cuda_backend(),
    triton_backend(),
    _REFERENCE,
)

# op name -> backends, for listings such as latentembed.ops.OPS.
BACKENDS = {"latent_cross_attention": ATTENTION_BACKENDS, "geglu_segment_mean": GEGLU_BACKENDS}


def _kernels(backend: str) -> dict:
    """``{op: (forward, backward)}`` of a kernel backend (``"triton"`` or ``"cuda"``), for the
    two ops ``"attention"`` and ``"geglu"``."""
    if backend == "triton":
        from . import triton as t  # on first use: importing triton takes a while

        return {
            "attention": (t.latent_attn_fwd_triton, t.latent_attn_bwd_triton),
            "geglu": (t.geglu_segment_mean_fwd_triton, t.geglu_segment_mean_bwd_triton),
        }
    return {
        "attention": (cuda.latent_attn_fwd_cuda, cuda.latent_attn_bwd_cuda),
        "geglu": (cuda.geglu_segment_mean_fwd_cuda, cuda.geglu_segment_mean_bwd_cuda),
    }


class LatentCrossAttentionFunction(torch.autograd.Function):
    """Autograd wrapper over a kernel backend's forward and backward ops.

    ``forward(x, ln_weight, ln_bias, m, u, eps, backend)`` with ``backend`` in
    ``{"triton", "cuda"}``: x [T, D], m and u [H, R, D] contiguous and in x's dtype; arguments
    are assumed valid (see :func:`latent_cross_attention`).
    """

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, m, u, eps: float, backend: str):
        forward, _ = _kernels(backend)["attention"]
        y, probs, mean, rstd = forward(x, ln_weight, ln_bias, m, u, eps)
        ctx.save_for_backward(x, ln_weight, ln_bias, m, u, probs, mean, rstd)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, ln_weight, ln_bias, m, u, probs, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        _, backward = _kernels(ctx.backend)["attention"]
        dx, dw, db, dm, du = backward(
            grad_y.contiguous(), x, ln_weight, ln_bias, m, u, probs, mean, rstd, need[3], need[4]
        )
        return dx, dw, db, dm if need[3] else None, du if need[4] else None, None, None


class GegluSegmentMeanFunction(torch.autograd.Function):
    """Autograd wrapper over a kernel backend's forward and backward ops.

    ``forward(a, cu_seqlens, backend)`` with ``backend`` in ``{"triton", "cuda"}``; arguments
    are assumed valid (see :func:`geglu_segment_mean`).
    """

    @staticmethod
    def forward(ctx, a, cu_seqlens, backend: str):
        forward, _ = _kernels(backend)["geglu"]
        ctx.save_for_backward(a, cu_seqlens)
        ctx.backend = backend
        return forward(a, cu_seqlens)

    @staticmethod
    def backward(ctx, grad_out):
        a, cu_seqlens = ctx.saved_tensors
        _, backward = _kernels(ctx.backend)["geglu"]
        return backward(grad_out.contiguous(), a, cu_seqlens), None, None


def _check_attention_args(x, ln_weight, ln_bias, m, u) -> None:
    checks.check_tensor("x", x)
    checks.check_floating("x", x)
    checks.check_ndim("x", x, 2, "[T, D] (packed pooled rows)")
    D = x.shape[1]
    if D == 0:
        raise ValueError(f"x must have D >= 1 features, got shape {tuple(x.shape)}")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        checks.check_tensor(name, t)
        checks.check_floating(name, t)
        checks.check_same_device(name, t, "x", x)
        if tuple(t.shape) != (D,):
            raise ValueError(f"{name} must have shape [D] = ({D},) to match x {tuple(x.shape)}, got {tuple(t.shape)}")
    for name, t in (("m", m), ("u", u)):
        checks.check_tensor(name, t)
        checks.check_floating(name, t)
        checks.check_same_device(name, t, "x", x)
        checks.check_ndim(name, t, 3, "[H, R, D] (heads, latents, features)")
        if t.shape[2] != D:
            raise ValueError(
                f"{name} must have shape [H, R, D] with D = {D} (x's features, x shape "
                f"{tuple(x.shape)}), got {tuple(t.shape)}"
            )
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} must have H >= 1 heads and R >= 1 latents, got {tuple(t.shape)}")
    if m.shape != u.shape:
        raise ValueError(f"m and u must have the same shape [H, R, D], got m {tuple(m.shape)} and u {tuple(u.shape)}")


def latent_cross_attention(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    m: torch.Tensor,
    u: torch.Tensor,
    *,
    eps: float = 1e-5,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Pre-norm cross-attention of token rows to a latent array, folded, with the residual.

    ``y = x + sum_h softmax_R(LN(x) @ m[h]^T) @ u[h]`` where LN is the LayerNorm with
    ``ln_weight``/``ln_bias``/``eps``. The folded matrices are ``m[h] = K_h Wq_h / sqrt(dim_head)``
    (scale included) and ``u[h] = V_h Wo_h^T``, both [R, D]. Rows never attend to each other, so
    pass only the rows that are pooled (packed): padding costs nothing.

    Args:
        x: [T, D] float32/float16/bfloat16 (float64 with the reference backend); T may be 0.
        ln_weight, ln_bias: [D], any floating dtype (used in float32).
        m, u: [H, R, D], any floating dtype; rounded to x's dtype (a differentiable cast).
        eps: LayerNorm epsilon.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``
            (``LATENTEMBED_BACKEND`` replaces ``"auto"``).
        validate: accepted for symmetry with the other ops; every check here reads only
            shapes, dtypes and devices (no device sync), so it always runs.

    Returns:
        [T, D] in x's dtype; LayerNorm, scores and softmax are computed in float32. Autocast
        does not change the computation (it is disabled inside). Differentiable with respect to
        x, ln_weight, ln_bias, m and u.

    Example:
        >>> x = torch.randn(5, 16)
        >>> m, u = torch.randn(2, 4, 16) / 4, torch.randn(2, 4, 16)
        >>> latent_cross_attention(x, torch.ones(16), torch.zeros(16), m, u).shape
        torch.Size([5, 16])
    """
    del validate
    _check_attention_args(x, ln_weight, ln_bias, m, u)
    chosen = select_backend("latent_cross_attention", ATTENTION_BACKENDS, backend, x.device, x.dtype, m.shape[1])
    if chosen.name == "reference":
        return latent_cross_attention_ref(x, ln_weight, ln_bias, m, u, eps)
    m = m.to(x.dtype).contiguous()
    u = u.to(x.dtype).contiguous()
    return LatentCrossAttentionFunction.apply(
        x.contiguous(), ln_weight.contiguous(), ln_bias.contiguous(), m, u, float(eps), chosen.name
    )


def _check_geglu_args(a, cu_seqlens, validate: bool) -> None:
    checks.check_tensor("a", a)
    checks.check_floating("a", a)
    checks.check_ndim("a", a, 2, "[T, 2F] (value half, then gate half)")
    if a.shape[1] == 0 or a.shape[1] % 2 != 0:
        raise ValueError(
            f"a must have an even number 2F >= 2 of columns ([value, gate] halves), got shape {tuple(a.shape)}"
        )
    checks.check_tensor("cu_seqlens", cu_seqlens)
    checks.check_same_device("cu_seqlens", cu_seqlens, "a", a)
    checks.check_cu_seqlens(cu_seqlens, a.shape[0], "a", values=validate)


def geglu_segment_mean(
    a: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Per-sequence mean of the GEGLU activation ``v * gelu(g)`` over packed rows.

    ``a = [v, g]`` is the output of the feed-forward's first Linear (bias included); gelu is the
    exact (erf) one, as in NV-Embed. Because the second Linear commutes with the mean,
    ``mean_t(W2 geglu(a_t) + b2) = W2 geglu_segment_mean(a) + b2``.

    Args:
        a: [T, 2F] float32/float16/bfloat16 (float64 with the reference backend).
        cu_seqlens: [B+1] int32 offsets (sequence b is rows ``cu_seqlens[b]:cu_seqlens[b+1]``).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        validate: check cu_seqlens' values (a device sync); skipped under torch.compile.

    Returns:
        [B, F] in a's dtype, accumulated in float32. An empty sequence gives zeros.
        Differentiable with respect to a.

    Example:
        >>> a = torch.randn(7, 6)
        >>> geglu_segment_mean(a, torch.tensor([0, 3, 7], dtype=torch.int32)).shape
        torch.Size([2, 3])
    """
    _check_geglu_args(a, cu_seqlens, validate)
    chosen = select_backend("geglu_segment_mean", GEGLU_BACKENDS, backend, a.device, a.dtype)
    if chosen.name == "reference":
        return geglu_segment_mean_ref(a, cu_seqlens)
    return GegluSegmentMeanFunction.apply(a.contiguous(), cu_seqlens.contiguous(), chosen.name)
