"""Masked mean pooling: the mean of each sequence's kept hidden states.

Three implementations behind one function: ``reference`` (plain PyTorch, the spec), ``triton``
and ``cuda`` (the compiled extension). See :func:`masked_mean_pool`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import checks
from ..dispatch import cuda_backend, reference_backend, select_backend, triton_backend
from . import cuda
from .reference import masked_mean_pool_ref

__all__ = ["masked_mean_pool", "masked_mean_pool_ref", "MaskedMeanFunction", "BACKENDS"]


def _kernels(name: str):
    """(forward, backward) ops of a kernel backend."""
    if name == "triton":
        from . import triton  # on first use: importing triton takes a while

        return triton.masked_mean_fwd_triton, triton.masked_mean_bwd_triton
    return cuda.masked_mean_fwd_cuda, cuda.masked_mean_bwd_cuda


def _cuda_supports(out_dtype: Optional[torch.dtype] = None, hidden_dtype: Optional[torch.dtype] = None):
    if out_dtype is not None and out_dtype != hidden_dtype:
        return "writes the mean in hidden's dtype only (out_dtype is not implemented in the CUDA kernels)"
    return None


BACKENDS = (
    cuda_backend(supports=_cuda_supports),
    triton_backend(),
    reference_backend(),
)


class MaskedMeanFunction(torch.autograd.Function):
    """Autograd wrapper over a kernel backend's forward and backward ops.

    ``forward(hidden, mask, cu_seqlens, backend, out_dtype)`` with ``backend`` in
    ``{"triton", "cuda"}``; ``out_dtype`` (None: hidden's) only with the Triton backend; arguments
    are assumed valid (see :func:`masked_mean_pool`).
    """

    @staticmethod
    def forward(ctx, hidden, mask, cu_seqlens, backend: str, out_dtype=None):
        forward, _ = _kernels(backend)
        ctx.save_for_backward(mask, cu_seqlens)
        ctx.backend, ctx.hidden_dtype = backend, hidden.dtype
        ctx.length = hidden.shape[0] if cu_seqlens is not None else hidden.shape[1]
        if out_dtype is None or out_dtype == hidden.dtype:
            return forward(hidden, mask, cu_seqlens)
        return forward(hidden, mask, cu_seqlens, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        mask, cu_seqlens = ctx.saved_tensors
        _, backward = _kernels(ctx.backend)
        if grad_out.dtype == ctx.hidden_dtype:
            grad_hidden = backward(grad_out.contiguous(), mask, cu_seqlens, ctx.length)
        else:  # out_dtype: the Triton kernel writes hidden's gradient in hidden's dtype directly
            grad_hidden = backward(grad_out.contiguous(), mask, cu_seqlens, ctx.length, grad_dtype=ctx.hidden_dtype)
        return grad_hidden, None, None, None, None


def _check_args(hidden, mask, cu_seqlens, validate: bool) -> None:
    if cu_seqlens is not None and mask is not None:
        raise ValueError("pass either mask (padded input) or cu_seqlens (packed input), not both")
    checks.check_hidden_states(hidden, cu_seqlens, validate=validate)
    if mask is not None:
        checks.check_row_mask("mask", mask, hidden, packed=False, keeps="keep")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have D >= 1 features, got shape {tuple(hidden.shape)}")


def masked_mean_pool(
    hidden: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    validate: bool = True,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Mean of the kept hidden states of each sequence.

    Args:
        hidden: padded [B, L, D] or packed [T, D] hidden states; float32, float16 or bfloat16
            (float64 with the reference backend). Any strides.
        mask: [B, L], bool or integer, nonzero = keep; padded input only. ``None`` keeps every
            position.
        cu_seqlens: [B+1] int32 offsets of the packed sequences (sequence b is rows
            ``cu_seqlens[b]:cu_seqlens[b+1]``); packed input only.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``
            (``LATENTEMBED_BACKEND`` replaces ``"auto"``).
        validate: check the values of ``cu_seqlens`` (starts at 0, non-decreasing, ends at T).
            That reads them on the host, a device sync; pass ``False`` in hot loops whose
            offsets are known to be valid. Under torch.compile the value checks are skipped
            (reading values would break the graph). Shape, dtype and device checks always run.
        out_dtype: dtype of the result (default: hidden's), e.g. ``torch.float32`` for a
            half-precision input whose mean must not be rounded to half precision: no float32
            copy of hidden is made, and hidden's gradient keeps hidden's dtype. The CUDA backend
            does not take it (``auto`` then picks Triton).

    Returns:
        [B, D] in ``out_dtype``, accumulated in float32. A sequence with nothing to keep gives
        zeros, and its hidden states get zero gradient.

    Example:
        >>> h = torch.randn(2, 5, 8)
        >>> mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
        >>> masked_mean_pool(h, mask).shape
        torch.Size([2, 8])
    """
    _check_args(hidden, mask, cu_seqlens, validate)
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")
    if out_dtype is not None and torch.promote_types(out_dtype, hidden.dtype) != out_dtype:
        raise ValueError(
            f"out_dtype must hold hidden's dtype ({checks.dtype_name(hidden.dtype)}) without rounding, "
            f"got {checks.dtype_name(out_dtype)}"
        )
    chosen = select_backend(
        "masked_mean_pool",
        BACKENDS,
        backend,
        hidden.device,
        hidden.dtype,
        out_dtype=out_dtype,
        hidden_dtype=hidden.dtype,
    )
    if chosen.name == "reference":
        return masked_mean_pool_ref(hidden, mask, cu_seqlens, out_dtype)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    return MaskedMeanFunction.apply(hidden, mask, cu_seqlens, chosen.name, out_dtype)
