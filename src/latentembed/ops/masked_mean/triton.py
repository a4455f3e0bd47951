"""Triton kernels for masked mean pooling, forward and backward.

One program owns one sequence and one BLOCK_D-wide slice of features and walks the sequence's
rows BLOCK_L at a time, so every output element is written by exactly one program: no atomics,
deterministic results. Padded and packed inputs share the kernels through constexpr flags:
padded rows are 0..L of sequence b (optionally filtered by the mask), packed rows are
cu_seqlens[b]..cu_seqlens[b+1] of the [T, D] tensor. Masked-out rows are never read (the load
is predicated on the mask), so padding costs no memory traffic. Strides are passed through, so
non-contiguous inputs need no copy.

The launchers are registered as torch custom ops with fake implementations, so torch.compile
traces them without a graph break.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
import triton.testing

from ..dispatch import device_guard, triton_interpreting
from ..tuning import select_configs, size_class
from ._shapes import grad_hidden_shape, pooled_shape

# (BLOCK_L, BLOCK_D, num_warps) tried by the autotuner on the GPU.
GPU_CONFIGS = [(8, 256, 4), (16, 256, 4), (16, 512, 8), (32, 128, 4), (8, 512, 4), (32, 256, 8)]


def _tuning_bench(kernel_call, quantiles):
    # The kernels take ~0.1 ms at the target shape: 25 ms of repetitions separate the configs
    # well, at a fifth of Triton's default tuning time (tests meet dozens of distinct D).
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _configs():
    if triton_interpreting():  # the interpreter runs each program in numpy: big tiles, few programs
        return [triton.Config({"BLOCK_L": 32, "BLOCK_D": 256}, num_warps=4)]
    return [triton.Config({"BLOCK_L": bl, "BLOCK_D": bd}, num_warps=w) for bl, bd, w in select_configs(GPU_CONFIGS)]


@triton.jit
def _row_range(cu_ptr, b, L, IS_VARLEN: tl.constexpr):
    """Rows [start, end) of sequence b: its cu_seqlens slice when packed, 0..L when padded."""
    if IS_VARLEN:
        start = tl.load(cu_ptr + b).to(tl.int64)
        end = tl.load(cu_ptr + b + 1).to(tl.int64)
    else:
        start = tl.zeros([], tl.int64)
        end = start + L
    return start, end


# Keys: D, the layout, and the size classes of the batch and of the rows per sequence (TUNE_B,
# TUNE_L: the grid and the loop length, which change the best tile).
_KEY = ["D", "HAS_MASK", "IS_VARLEN", "TUNE_B", "TUNE_L"]


@triton.autotune(configs=_configs(), key=_KEY, do_bench=_tuning_bench)
@triton.jit
def _masked_mean_fwd_kernel(
    h_ptr,
    mask_ptr,
    cu_ptr,
    out_ptr,
    L,
    D,
    stride_hb,
    stride_hl,
    stride_hd,
    stride_mb,
    stride_ml,
    stride_ob,
    TUNE_B,
    TUNE_L,
    HAS_MASK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    start, end = _row_range(cu_ptr, b, L, IS_VARLEN)
    if not IS_VARLEN:
        h_ptr += b * stride_hb
    # Accumulate a [BLOCK_L, BLOCK_D] tile in fp32 and reduce over rows once at the end: more
    # independent loads in flight per iteration than a row-at-a-time loop.
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    count = tl.zeros([BLOCK_L], dtype=tl.int32)
    for row0 in range(start, end, BLOCK_L):
        rows = row0 + tl.arange(0, BLOCK_L)
        keep = rows < end
        if HAS_MASK:
            m = tl.load(mask_ptr + b * stride_mb + rows * stride_ml, mask=keep, other=0)
            keep = keep & (m != 0)
        x = tl.load(
            h_ptr + rows[:, None] * stride_hl + offs_d[None, :] * stride_hd,
            mask=keep[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc += x.to(tl.float32)
        count += keep.to(tl.int32)
    n = tl.maximum(tl.sum(count, axis=0), 1).to(tl.float32)
    mean = tl.sum(acc, axis=0) / n
    tl.store(out_ptr + b * stride_ob + offs_d, mean.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.autotune(configs=_configs(), key=_KEY, do_bench=_tuning_bench)
@triton.jit
def _masked_mean_bwd_kernel(
    grad_out_ptr,
    mask_ptr,
    cu_ptr,
    grad_h_ptr,
    L,
    D,
    stride_gob,
    stride_mb,
    stride_ml,
    stride_gb,
    stride_gl,
    TUNE_B,
    TUNE_L,
    HAS_MASK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    start, end = _row_range(cu_ptr, b, L, IS_VARLEN)
    if IS_VARLEN:
        n = end - start
    else:
        grad_h_ptr += b * stride_gb
        if HAS_MASK:  # recount the kept rows: reading B*L mask bytes is cheaper than saving counts
            count = tl.zeros([BLOCK_L], dtype=tl.int32)
            for row0 in range(0, L, BLOCK_L):
                rows = row0 + tl.arange(0, BLOCK_L)
                m = tl.load(mask_ptr + b * stride_mb + rows * stride_ml, mask=rows < L, other=0)
                count += (m != 0).to(tl.int32)
            n = tl.sum(count, axis=0).to(tl.int64)
        else:
            n = end
    # A division, not a multiply by 1/n: the same rounding as the reference's autograd.
    g = tl.load(grad_out_ptr + b * stride_gob + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    g = g / tl.maximum(n, 1).to(tl.float32)
    for row0 in range(start, end, BLOCK_L):
        rows = row0 + tl.arange(0, BLOCK_L)
        in_seq = rows < end
        tile = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32) + g[None, :]
        if HAS_MASK:
            m = tl.load(mask_ptr + b * stride_mb + rows * stride_ml, mask=in_seq, other=0)
            tile = tl.where((m != 0)[:, None], tile, 0.0)
        tl.store(
            grad_h_ptr + rows[:, None] * stride_gl + offs_d[None, :],
            tile.to(grad_h_ptr.dtype.element_ty),
            mask=in_seq[:, None] & d_ok[None, :],
        )


def _mask_for_kernel(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Triton's bool pointers are awkward to load from; a uint8 view of the same bytes is free.
    return mask.view(torch.uint8) if mask is not None and mask.dtype == torch.bool else mask


def _grid(batch: int, D: int):
    return lambda meta: (batch, triton.cdiv(D, meta["BLOCK_D"]))


@torch.library.custom_op("latentembed::masked_mean_fwd_triton", mutates_args=())
def masked_mean_fwd_triton(
    hidden: torch.Tensor,
    mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """hidden [B, L, D] (+ mask [B, L]) or [T, D] + cu_seqlens [B+1] -> [B, D] in ``out_dtype``
    (default: hidden's); the kernel rounds its float32 mean once, to that dtype.

    hidden and mask may have any strides (passed to the kernel); cu_seqlens is read as contiguous."""
    varlen = cu_seqlens is not None
    batch, D = pooled_shape(hidden, cu_seqlens)
    out = torch.empty(batch, D, device=hidden.device, dtype=out_dtype or hidden.dtype)
    if varlen:
        cu_seqlens = cu_seqlens.contiguous()
        strides = (0, hidden.stride(0), hidden.stride(1))
        length = hidden.shape[0]
    else:
        strides = hidden.stride()
        length = hidden.shape[1]
    mask = _mask_for_kernel(mask)
    mask_strides = mask.stride() if mask is not None else (0, 0)
    with device_guard(hidden):
        _masked_mean_fwd_kernel[_grid(batch, D)](
            hidden,
            mask,
            cu_seqlens,
            out,
            length,
            D,
            *strides,
            *mask_strides,
            out.stride(0),
            size_class(batch),
            size_class(length if not varlen else -(-length // max(batch, 1))),
            HAS_MASK=mask is not None,
            IS_VARLEN=varlen,
        )
    return out


@masked_mean_fwd_triton.register_fake
def _(hidden, mask, cu_seqlens, out_dtype=None):
    return hidden.new_empty(pooled_shape(hidden, cu_seqlens), dtype=out_dtype or hidden.dtype)


@torch.library.custom_op("latentembed::masked_mean_bwd_triton", mutates_args=())
def masked_mean_bwd_triton(
    grad_out: torch.Tensor,
    mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    length: int,
    grad_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """grad_out [B, D] -> grad of hidden: [B, length, D] padded, [length, D] packed, in
    ``grad_dtype`` (default: grad_out's; hidden's dtype when the forward had an out_dtype)."""
    varlen = cu_seqlens is not None
    batch, D = grad_out.shape
    # The kernel takes grad_out's row stride only, and reads cu_seqlens as contiguous.
    grad_out = grad_out if grad_out.stride(1) == 1 else grad_out.contiguous()
    cu_seqlens = cu_seqlens.contiguous() if varlen else None
    shape = grad_hidden_shape(grad_out, cu_seqlens, length)
    grad_h = torch.empty(shape, device=grad_out.device, dtype=grad_dtype or grad_out.dtype)
    mask = _mask_for_kernel(mask)
    mask_strides = mask.stride() if mask is not None else (0, 0)
    grad_strides = (0, grad_h.stride(0)) if varlen else grad_h.stride()[:2]
    with device_guard(grad_out):
        _masked_mean_bwd_kernel[_grid(batch, D)](
            grad_out,
            mask,
            cu_seqlens,
            grad_h,
            length,
            D,
            grad_out.stride(0),
            *mask_strides,
            *grad_strides,
            size_class(batch),
            size_class(length if not varlen else -(-length // max(batch, 1))),
            HAS_MASK=mask is not None,
            IS_VARLEN=varlen,
        )
    return grad_h


@masked_mean_bwd_triton.register_fake
def _(grad_out, mask, cu_seqlens, length, grad_dtype=None):
    return grad_out.new_empty(grad_hidden_shape(grad_out, cu_seqlens, length), dtype=grad_dtype or grad_out.dtype)


#: The op's Triton kernels by name, for tools that compile or inspect them (the sm_90 resource
#: reports of latentembed.bench.kernels).
KERNELS = {"fwd": _masked_mean_fwd_kernel, "bwd": _masked_mean_bwd_kernel}
