"""Multi-LoRA linear: per-row adapters added to a base layer's output in one fused pass.

Two implementations behind one function: ``reference`` (plain PyTorch, the spec) and ``triton``
(segmented shrink/expand kernels, forward and backward). See :func:`multi_lora_linear_add` and
:func:`group_by_adapter`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import checks
from ..dispatch import reference_backend, select_backend, triton_backend
from .grouping import BLOCK_M, REDUCE_M, LoRAGrouping, group_by_adapter
from .reference import multi_lora_linear_add_ref

__all__ = [
    "multi_lora_linear_add",
    "multi_lora_linear_add_ref",
    "group_by_adapter",
    "LoRAGrouping",
    "MultiLoRAFunction",
    "BACKENDS",
    "MAX_TRITON_RANK",
    "BLOCK_M",
    "REDUCE_M",
]

#: Largest r_max the Triton kernels take: the [BLOCK_M, R] shrink tile lives in registers.
MAX_TRITON_RANK = 128


def _triton_supports(lora_a: torch.Tensor) -> Optional[str]:
    rank = lora_a.shape[1]
    if rank > MAX_TRITON_RANK:
        return f"supports r_max <= {MAX_TRITON_RANK}, got lora_a with R = {rank}"
    return None


BACKENDS = (
    triton_backend(supports=_triton_supports),
    reference_backend(),
)


def _triton_ops():
    from . import triton  # on first use: importing triton takes a while

    return triton


class MultiLoRAFunction(torch.autograd.Function):
    """Autograd wrapper over the Triton forward and backward ops.

    ``forward(base_out, x, lora_a, lora_b, scaling, sorted_rows, blocks, reduce_blocks,
    reduce_offsets)``; arguments are assumed valid (see :func:`multi_lora_linear_add`).
    The gradient of base_out is the upstream gradient itself; scaling gets none.
    """

    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, scaling, sorted_rows, blocks, reduce_blocks, reduce_offsets):
        ops = _triton_ops()
        out, xs = ops.multi_lora_fwd_triton(base_out, x, lora_a, lora_b, scaling, sorted_rows, blocks)
        ctx.save_for_backward(x, lora_a, lora_b, scaling, xs, sorted_rows, blocks, reduce_blocks, reduce_offsets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_a, lora_b, scaling, xs, sorted_rows, blocks, reduce_blocks, reduce_offsets = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = grad_a = grad_b = None
        if needs[1] or needs[2] or needs[3]:
            grad_x, grad_a, grad_b = _triton_ops().multi_lora_bwd_triton(
                grad_out.contiguous(),
                x,
                lora_a,
                lora_b,
                scaling,
                xs,
                sorted_rows,
                blocks,
                reduce_blocks,
                reduce_offsets,
                needs[1],
                needs[2],
                needs[3],
            )
            grad_x = grad_x if needs[1] else None
            grad_a = grad_a if needs[2] else None
            grad_b = grad_b if needs[3] else None
        return grad_out if needs[0] else None, grad_x, grad_a, grad_b, None, None, None, None, None


def _check_args(base_out, x, lora_a, lora_b, scaling, grouping) -> None:
    for name, value in (("base_out", base_out), ("x", x), ("lora_a", lora_a), ("lora_b", lora_b), ("scaling", scaling)):
        checks.check_tensor(name, value)
    if not isinstance(grouping, LoRAGrouping):
        raise TypeError(
            f"grouping must be the LoRAGrouping returned by group_by_adapter, got {type(grouping).__name__}"
        )
    checks.check_floating("x", x)
    checks.check_ndim("x", x, 2, "[N, in]")
    checks.check_ndim("base_out", base_out, 2, "[N, out]")
    checks.check_ndim("lora_a", lora_a, 3, "[T, R, in]")
    checks.check_ndim("lora_b", lora_b, 3, "[T, out, R]")
    checks.check_ndim("scaling", scaling, 1, "[T]")
    for name, value in (("base_out", base_out), ("lora_a", lora_a), ("lora_b", lora_b)):
        if value.dtype != x.dtype:
            raise TypeError(
                f"{name} must have x's dtype ({checks.dtype_name(x.dtype)}), got {checks.dtype_name(value.dtype)}"
            )
    if not scaling.dtype.is_floating_point:
        raise TypeError(f"scaling must be a float tensor (float32), got {checks.dtype_name(scaling.dtype)}")
    n, d_in = x.shape
    t, r, a_in = lora_a.shape
    if t < 1 or r < 1:
        raise ValueError(f"lora_a [T, R, in] needs T >= 1 and R >= 1, got shape {tuple(lora_a.shape)}")
    if a_in != d_in:
        raise ValueError(f"lora_a [T, R, in] has in = {a_in}, but x [N, in] has in = {d_in} (x shape {tuple(x.shape)})")
    if base_out.shape[0] != n:
        raise ValueError(
            f"base_out has N = {base_out.shape[0]} rows, x has N = {n} "
            f"(shapes {tuple(base_out.shape)}, {tuple(x.shape)})"
        )
    d_out = base_out.shape[1]
    if tuple(lora_b.shape) != (t, d_out, r):
        raise ValueError(
            f"lora_b must have shape [T, out, R] = {(t, d_out, r)} (T, R from lora_a, out from base_out), "
            f"got {tuple(lora_b.shape)}"
        )
    if tuple(scaling.shape) != (t,):
        raise ValueError(f"scaling must have shape [T] = ({t},), got {tuple(scaling.shape)}")
    if grouping.num_rows != n:
        raise ValueError(f"grouping was built for N = {grouping.num_rows} rows, x has N = {n}")
    if grouping.num_adapters != t:
        raise ValueError(f"grouping was built for T = {grouping.num_adapters} adapters, lora_a has T = {t}")
    for name, value in (
        ("base_out", base_out),
        ("lora_a", lora_a),
        ("lora_b", lora_b),
        ("scaling", scaling),
        ("grouping.sorted_rows", grouping.sorted_rows),
    ):
        checks.check_same_device(name, value, "x", x)


def multi_lora_linear_add(
    base_out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    grouping: LoRAGrouping,
    *,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Add each row's own LoRA update to a base layer's output.

    ``out[n] = base_out[n] + scaling[t] * (x[n] @ lora_a[t].T) @ lora_b[t].T`` with
    ``t = adapter_index[n]`` from ``grouping``; rows with t = -1 get ``base_out[n]`` unchanged.

    Args:
        base_out: [N, out], the base Linear's output for these rows.
        x: [N, in], the LoRA input (already dropped out by the caller if dropout is used).
        lora_a: [T, R, in] stacked A matrices; R = r_max, smaller ranks zero-padded (the pads
            get exactly zero gradient).
        lora_b: [T, out, R] stacked B matrices.
        scaling: [T] float32, alpha_t / rank_t; not differentiated.
        grouping: :func:`group_by_adapter` of the N rows' adapter index, built once per forward.
        backend: ``"auto"``, ``"reference"`` or ``"triton"`` (``LATENTEMBED_BACKEND`` replaces
            ``"auto"``); auto picks Triton on CUDA and the reference on CPU.
        validate: check shapes, dtypes and devices (metadata only, no sync). ``False`` skips the
            checks for callers that validated once (index values are always checked by
            group_by_adapter).

    Returns:
        [N, out], a new tensor in x's dtype (float32, float16, bfloat16; float64 with the
        reference), accumulated in float32. Differentiable in base_out, x, lora_a and lora_b.

    Example:
        >>> x, base = torch.randn(5, 8), torch.randn(5, 6)
        >>> a, b = torch.randn(3, 4, 8), torch.randn(3, 6, 4)
        >>> g = group_by_adapter(torch.tensor([2, -1, 0, 2, 0]), num_adapters=3)
        >>> multi_lora_linear_add(base, x, a, b, torch.full((3,), 0.5), g).shape
        torch.Size([5, 6])
    """
    if validate:
        _check_args(base_out, x, lora_a, lora_b, scaling, grouping)
    chosen = select_backend("multi_lora_linear_add", BACKENDS, backend, x.device, x.dtype, lora_a)
    if chosen.name == "reference":
        return multi_lora_linear_add_ref(base_out, x, lora_a, lora_b, scaling, grouping.adapter_index)
    return MultiLoRAFunction.apply(
        base_out,
        x,
        lora_a,
        lora_b,
        scaling.float(),
        grouping.sorted_rows,
        grouping.blocks,
        grouping.reduce_blocks,
        grouping.reduce_offsets,
    )
