"""Triton kernels for multi-LoRA linear, forward and backward (segmented shrink / expand).

Rows are pre-sorted by adapter (:func:`group_by_adapter`) and cut into blocks of at most
``BLOCK_M`` rows of a single adapter, so each program multiplies a dense tile by one adapter's
weights with ``tl.dot``; there is no per-adapter launch and no merged weight.

Forward, one program per block (or per SUB_M-row part of it, times SPLIT_N slices of the output
columns; autotuned):
    h = x[rows] @ A_t^T * s_t          [SUB_M, R] in fp32 registers (loop over in)
    out[rows] = base_out[rows] + h @ B_t^T   (loop over out, one read of base_out, one write)
h is also stored ([N, R] fp32, tiny) because the backward needs it for dB. A block of base-only
rows copies base_out and does nothing else.

Backward reuses the same kernel with the roles swapped (shrink by B_t, expand by A_t):
    g = dy[rows] @ B_t * s_t            [SUB_M, R]   (stored, needed for dA)
    dx[rows] = g @ A_t                  (base-only rows: zeros)
and the weight gradients are per-adapter sums over that adapter's rows:
    dA_t = g_t^T x_t,   dB_t = (dy_t^T h_t)  (h already carries s_t)
They are computed deterministically in two steps instead of with float atomics: each "reduce
block" (<= REDUCE_M rows of one adapter) writes an fp32 partial [R, K] tile, then a second small
kernel sums each adapter's partials in a fixed order. Atomics would make training runs
non-reproducible bit for bit; the partials cost ~N/REDUCE_M * R * K * 4 bytes, a few MB at the
benchmark shape, against the [N, in] and [N, out] tensors every pass reads anyway. A single
program per (adapter, column tile) looping over all its rows would avoid the partials but
serialises an adapter's rows, which starves the GPU when one adapter holds most of the batch.

R is padded to R_PAD >= 16 (tl.dot's minimum) with masked loads; zero-padded ranks of smaller
adapters multiply to exact zeros, so their gradient pads stay exactly zero. fp32 inputs use
IEEE (not TF32) dots to match PyTorch's fp32 matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing

from ..dispatch import device_guard, triton_interpreting
from ..tuning import select_configs, size_class
from .grouping import BLOCK_M

# (SUB_M, BLOCK_K, BLOCK_N, SPLIT_N, num_warps, num_stages) tried by the autotuner on the GPU,
# best guess first, for 16-bit inputs (tensor-core dots) and for fp32 (IEEE dots on the FMA units:
# operands in registers, so smaller tiles). One BLOCK_M block of the grouping runs as
# BLOCK_M // SUB_M programs times SPLIT_N slices of the output columns (each slice recomputes the
# cheap [SUB_M, R] shrink): at the benchmark shape a batch of 8192 rows is only ~130 blocks,
# fewer than one per SM pair, so splitting buys memory-level parallelism for the bandwidth-bound
# pass over base_out and out. Every configuration compiles for sm_90 without register spills at
# every rank class up to R = 128 (tests/ops/compile_multi_lora_sm90.py); dropped after that
# check: (32, 64, 256, 2, 8, 3) (4 B in the backward) and, for fp32, every 16-bit tile (up to 77 KB
# a thread at R = 128).
SHRINK_EXPAND_CONFIGS = [
    (64, 64, 128, 1, 4, 3),
    (64, 128, 128, 2, 4, 3),
    (64, 64, 128, 4, 4, 3),
    (64, 64, 256, 1, 8, 3),
    (32, 64, 128, 1, 4, 3),
    (32, 128, 128, 2, 4, 3),
    (64, 128, 64, 1, 4, 4),
]
SHRINK_EXPAND_FP32_CONFIGS = [(16, 32, 64, 1, 4, 2)]
# (BLOCK_K, num_warps, num_stages) for the weight-gradient partials.
PARTIAL_CONFIGS = [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3)]
PARTIAL_FP32_CONFIGS = [(32, 4, 2), (16, 4, 2)]


def _tuning_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _shrink_expand_config(sm, bk, bn, sp, w, s):
    return triton.Config({"SUB_M": sm, "BLOCK_K": bk, "BLOCK_N": bn, "SPLIT_N": sp}, num_warps=w, num_stages=s)


def _shrink_expand_configs():
    if triton_interpreting():  # numpy per program: big tiles, few programs
        # SUB_M < BLOCK_M so that CPU tests cover the sub-block split (and its empty sub-blocks).
        return [triton.Config({"SUB_M": 32, "BLOCK_K": 64, "BLOCK_N": 64, "SPLIT_N": 1}, num_warps=4)]
    return [_shrink_expand_config(*c) for c in SHRINK_EXPAND_CONFIGS + SHRINK_EXPAND_FP32_CONFIGS]


def _partial_configs():
    if triton_interpreting():
        return [triton.Config({"BLOCK_K": 64}, num_warps=4)]
    shipped = PARTIAL_CONFIGS + PARTIAL_FP32_CONFIGS
    return [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s) for bk, w, s in shipped]


def _prune_by_dtype(half: list, fp32: list, key):
    """An early_config_prune keeping the configurations of the input's dtype (x_ptr), then the
    autotune mode's share of them."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        wanted = fp32 if args["x_ptr"].dtype == torch.float32 else half
        return select_configs([c for c in configs if key(c) in wanted])

    return prune


_prune_shrink_expand = _prune_by_dtype(
    SHRINK_EXPAND_CONFIGS,
    SHRINK_EXPAND_FP32_CONFIGS,
    lambda c: (*(c.kwargs[k] for k in ("SUB_M", "BLOCK_K", "BLOCK_N", "SPLIT_N")), c.num_warps, c.num_stages),
)
_prune_partial = _prune_by_dtype(
    PARTIAL_CONFIGS, PARTIAL_FP32_CONFIGS, lambda c: (c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
)


def shipped_configs(kernel: str, fp32: bool) -> list:
    """The configuration tuples the autotuner may try: ``kernel`` "shrink_expand" or "partial"."""
    if kernel == "shrink_expand":
        return list(SHRINK_EXPAND_FP32_CONFIGS if fp32 else SHRINK_EXPAND_CONFIGS)
    return list(PARTIAL_FP32_CONFIGS if fp32 else PARTIAL_CONFIGS)


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots for fp32 inputs (PyTorch's fp32 matmul does not use TF32 by default); the
    default for half types, where the option does not apply."""
    return "ieee" if dtype == torch.float32 else "tf32"


def rank_pad(rank: int) -> int:
    """R rounded up to a power of two >= 16 (tl.dot needs every dimension >= 16)."""
    return max(16, triton.next_power_of_2(rank))


@triton.autotune(
    configs=_shrink_expand_configs(),
    key=["K", "M_OUT", "R_PAD", "HAS_BASE", "STORE_H", "TUNE_BLOCKS"],
    prune_configs_by={"early_config_prune": _prune_shrink_expand},
    do_bench=_tuning_bench,
)
@triton.jit
def _shrink_expand_kernel(
    x_ptr,
    w1_ptr,
    w2_ptr,
    scale_ptr,
    base_ptr,
    y_ptr,
    h_ptr,
    rows_ptr,
    blocks_ptr,
    K,
    M_OUT,
    R,
    stride_xn,
    stride_xk,
    stride_w1t,
    stride_w1r,
    stride_w1k,
    stride_w2t,
    stride_w2m,
    stride_w2r,
    stride_bn,
    stride_bm,
    stride_yn,
    stride_ym,
    TUNE_BLOCKS,
    HAS_BASE: tl.constexpr,
    STORE_H: tl.constexpr,
    STORE_Y: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SUB_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_N: tl.constexpr,
):
    """y[rows] = (base[rows] if HAS_BASE else 0) + (x[rows] @ W1_t^T * s_t) @ W2_t^T for one block.

    W1_t is [R, K] and W2_t is [M_OUT, R], both addressed through strides so the backward can
    pass B and A transposed without a copy. h = x[rows] @ W1_t^T * s_t is stored at the block's
    positions ([N, R] fp32) when STORE_H.
    """
    blk = tl.program_id(0) // (BLOCK_M // SUB_M)
    split = tl.program_id(1)
    adapter = tl.load(blocks_ptr + blk * 3)
    start = tl.load(blocks_ptr + blk * 3 + 1) + (tl.program_id(0) % (BLOCK_M // SUB_M)) * SUB_M
    end = tl.load(blocks_ptr + blk * 3 + 2)
    pos = start + tl.arange(0, SUB_M)
    row_ok = pos < end
    rows = tl.load(rows_ptr + pos, mask=row_ok, other=0).to(tl.int64)
    n_first = split * BLOCK_N
    n_step = SPLIT_N * BLOCK_N
    # A sub-block past the end of a short block has no rows: it takes the (fully masked) base
    # branch instead of reading adapter weights for nothing.
    if (adapter < 0) | (start >= end):
        # Base-only rows: no weight is read and no arithmetic is done. h gets zeros so that the
        # op's outputs are fully defined (nothing reads them).
        if STORE_H:
            if split == 0:
                offs_r = tl.arange(0, R_PAD)
                tl.store(
                    h_ptr + pos[:, None] * R + offs_r[None, :],
                    tl.zeros([SUB_M, R_PAD], dtype=tl.float32),
                    mask=row_ok[:, None] & (offs_r < R)[None, :],
                )
        if STORE_Y:
            for n0 in range(n_first, M_OUT, n_step):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask = row_ok[:, None] & (offs_n < M_OUT)[None, :]
                if HAS_BASE:
                    tile = tl.load(base_ptr + rows[:, None] * stride_bn + offs_n[None, :] * stride_bm, mask=mask)
                else:
                    tile = tl.zeros([SUB_M, BLOCK_N], dtype=y_ptr.dtype.element_ty)
                tl.store(y_ptr + rows[:, None] * stride_yn + offs_n[None, :] * stride_ym, tile, mask=mask)
    else:
        offs_r = tl.arange(0, R_PAD)
        r_ok = offs_r < R
        w1 = w1_ptr + adapter.to(tl.int64) * stride_w1t
        h = tl.zeros([SUB_M, R_PAD], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xt = tl.load(
                x_ptr + rows[:, None] * stride_xn + offs_k[None, :] * stride_xk,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            wt = tl.load(
                w1 + offs_k[:, None] * stride_w1k + offs_r[None, :] * stride_w1r,
                mask=k_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            h = tl.dot(xt, wt, h, input_precision=DOT_PRECISION)
        h = h * tl.load(scale_ptr + adapter)
        if STORE_H:
            if split == 0:
                tl.store(h_ptr + pos[:, None] * R + offs_r[None, :], h, mask=row_ok[:, None] & r_ok[None, :])
        if STORE_Y:
            # Rounded to the input dtype for the tensor-core dot, as an unfused PyTorch chain
            # rounds x @ A^T; accumulation stays fp32.
            h_lp = h.to(x_ptr.dtype.element_ty)
            w2 = w2_ptr + adapter.to(tl.int64) * stride_w2t
            for n0 in range(n_first, M_OUT, n_step):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_ok = offs_n < M_OUT
                mask = row_ok[:, None] & n_ok[None, :]
                wt2 = tl.load(
                    w2 + offs_r[:, None] * stride_w2r + offs_n[None, :] * stride_w2m,
                    mask=r_ok[:, None] & n_ok[None, :],
                    other=0.0,
                )
                acc = tl.dot(h_lp, wt2, input_precision=DOT_PRECISION)
                if HAS_BASE:
                    acc += tl.load(
                        base_ptr + rows[:, None] * stride_bn + offs_n[None, :] * stride_bm, mask=mask, other=0.0
                    ).to(tl.float32)
                tl.store(
                    y_ptr + rows[:, None] * stride_yn + offs_n[None, :] * stride_ym,
                    acc.to(y_ptr.dtype.element_ty),
                    mask=mask,
                )


@triton.autotune(
    configs=_partial_configs(),
    key=["K", "R_PAD", "TUNE_BLOCKS"],
    prune_configs_by={"early_config_prune": _prune_partial},
    do_bench=_tuning_bench,
)
@triton.jit
def _weight_grad_partial_kernel(
    h_ptr,
    x_ptr,
    rows_ptr,
    rblocks_ptr,
    part_ptr,
    K,
    R,
    stride_xn,
    stride_xk,
    TUNE_BLOCKS,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """part[rb] = h[positions of rb]^T @ x[rows of rb, k tile]: one [R, BLOCK_K] fp32 partial."""
    rb = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    start = tl.load(rblocks_ptr + rb * 3 + 1)
    end = tl.load(rblocks_ptr + rb * 3 + 2)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    acc = tl.zeros([R_PAD, BLOCK_K], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_M):
        pos = p0 + tl.arange(0, BLOCK_M)
        ok = pos < end
        rows = tl.load(rows_ptr + pos, mask=ok, other=0).to(tl.int64)
        ht = tl.load(h_ptr + pos[None, :] * R + offs_r[:, None], mask=r_ok[:, None] & ok[None, :], other=0.0)
        xt = tl.load(
            x_ptr + rows[:, None] * stride_xn + offs_k[None, :] * stride_xk,
            mask=ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(ht.to(x_ptr.dtype.element_ty), xt, acc, input_precision=DOT_PRECISION)
    tl.store(
        part_ptr + rb.to(tl.int64) * R * K + offs_r[:, None] * K + offs_k[None, :],
        acc,
        mask=r_ok[:, None] & k_ok[None, :],
    )


@triton.jit
def _sum_partials_kernel(
    part_ptr,
    offsets_ptr,
    out_ptr,
    K,
    R,
    stride_ot,
    stride_or,
    stride_ok,
    BLOCK: tl.constexpr,
):
    """out[t, r, k] = sum of adapter t's partials [R, K], in block order (deterministic); 0 if none."""
    t = tl.program_id(0)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < R * K
    lo = tl.load(offsets_ptr + t).to(tl.int64)  # int64 loop index: rb * R * K may pass 2**31
    hi = tl.load(offsets_ptr + t + 1).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for rb in range(lo, hi):
        acc += tl.load(part_ptr + rb * R * K + idx, mask=ok, other=0.0)
    r = idx // K
    k = idx % K
    tl.store(
        out_ptr + t.to(tl.int64) * stride_ot + r * stride_or + k * stride_ok, acc.to(out_ptr.dtype.element_ty), mask=ok
    )


def _shrink_expand(x, w1_strides, w1, w2_strides, w2, scaling, base, y, h, rows, blocks, K, M_OUT, R, store_h, store_y):
    num_blocks = blocks.shape[0]
    if num_blocks == 0:
        return
    base_strides = base.stride() if base is not None else (0, 0)
    y_strides = y.stride() if store_y else (0, 0)
    grid = lambda meta: (num_blocks * (BLOCK_M // meta["SUB_M"]), meta["SPLIT_N"])  # noqa: E731
    _shrink_expand_kernel[grid](
        x,
        w1,
        w2,
        scaling,
        base,
        y,
        h,
        rows,
        blocks,
        K,
        M_OUT,
        R,
        *x.stride(),
        *w1_strides,
        *w2_strides,
        *base_strides,
        *y_strides,
        size_class(num_blocks),
        HAS_BASE=base is not None,
        STORE_H=store_h,
        STORE_Y=store_y,
        R_PAD=rank_pad(R),
        BLOCK_M=BLOCK_M,
        DOT_PRECISION=dot_precision(x.dtype),
    )


def _weight_grad(h, x, rows, reduce_blocks, reduce_offsets, out, out_strides, R):
    """out[t] (through out_strides (t, r, k)) = sum over adapter t's rows of h^T x."""
    K = x.shape[1]
    num_rb = reduce_blocks.shape[0]
    num_adapters = reduce_offsets.shape[0] - 1
    part = torch.empty(num_rb, R, K, device=x.device, dtype=torch.float32)
    if num_rb:
        grid = lambda meta: (num_rb, triton.cdiv(K, meta["BLOCK_K"]))  # noqa: E731
        _weight_grad_partial_kernel[grid](
            h,
            x,
            rows,
            reduce_blocks,
            part,
            K,
            R,
            *x.stride(),
            size_class(num_rb),
            R_PAD=rank_pad(R),
            BLOCK_M=BLOCK_M,
            DOT_PRECISION=dot_precision(x.dtype),
        )
    block = 1024
    _sum_partials_kernel[(num_adapters, triton.cdiv(R * K, block))](
        part,
        reduce_offsets,
        out,
        K,
        R,
        *out_strides,
        BLOCK=block,
    )


@torch.library.custom_op("latentembed::multi_lora_fwd_triton", mutates_args=())
def multi_lora_fwd_triton(
    base_out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    sorted_rows: torch.Tensor,
    blocks: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [N, out] = base_out + LoRA delta, h [N, R] fp32 = s_t * x A_t^T at sorted positions).

    base_out, x, lora_a and lora_b may have any strides (passed to the kernel)."""
    n, d_in = x.shape
    _, rank, _ = lora_a.shape
    d_out = base_out.shape[1]
    # Indexed by position in the kernel; no-ops for group_by_adapter's tables.
    scaling, sorted_rows, blocks = (t.contiguous() for t in (scaling, sorted_rows, blocks))
    out = torch.empty(n, d_out, device=x.device, dtype=x.dtype)
    h = torch.empty(n, rank, device=x.device, dtype=torch.float32)
    with device_guard(x):
        _shrink_expand(
            x,
            lora_a.stride(),
            lora_a,
            lora_b.stride(),
            lora_b,
            scaling,
            base_out,
            out,
            h,
            sorted_rows,
            blocks,
            d_in,
            d_out,
            rank,
            store_h=True,
            store_y=True,
        )
    return out, h


@multi_lora_fwd_triton.register_fake
def _(base_out, x, lora_a, lora_b, scaling, sorted_rows, blocks):
    n, rank = x.shape[0], lora_a.shape[1]
    return x.new_empty(n, base_out.shape[1]), x.new_empty(n, rank, dtype=torch.float32)


@torch.library.custom_op("latentembed::multi_lora_bwd_triton", mutates_args=())
def multi_lora_bwd_triton(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    h: torch.Tensor,
    sorted_rows: torch.Tensor,
    blocks: torch.Tensor,
    reduce_blocks: torch.Tensor,
    reduce_offsets: torch.Tensor,
    need_x: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [N, in], dA [T, R, in], dB [T, out, R]); a gradient not needed comes back empty [0]."""
    n, d_in = x.shape
    _, rank, _ = lora_a.shape
    d_out = grad_out.shape[1]
    # Indexed by position in the kernels (grad_out, x and the weights go with their strides).
    scaling, h, sorted_rows, blocks, reduce_blocks, reduce_offsets = (
        t.contiguous() for t in (scaling, h, sorted_rows, blocks, reduce_blocks, reduce_offsets)
    )
    with device_guard(x):
        # Distinct empty tensors: outputs of a custom op may not alias each other.
        grad_x, grad_a, grad_b = x.new_empty(0), x.new_empty(0), x.new_empty(0)
        if need_x or need_a:
            g = torch.empty(n, rank, device=x.device, dtype=torch.float32)
            if need_x:
                grad_x = torch.empty(n, d_in, device=x.device, dtype=x.dtype)
            b_as_w1 = (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1))  # B_t^T: [R, out]
            a_as_w2 = (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1))  # A_t^T: [in, R]
            _shrink_expand(
                grad_out,
                b_as_w1,
                lora_b,
                a_as_w2,
                lora_a,
                scaling,
                None,
                grad_x,
                g,
                sorted_rows,
                blocks,
                d_out,
                d_in,
                rank,
                store_h=need_a,
                store_y=need_x,
            )
            if need_a:
                grad_a = torch.empty_like(lora_a, memory_format=torch.contiguous_format)
                _weight_grad(g, x, sorted_rows, reduce_blocks, reduce_offsets, grad_a, grad_a.stride(), rank)
        if need_b:
            grad_b = torch.empty_like(lora_b, memory_format=torch.contiguous_format)
            # partials are [R, out]; dB_t is [out, R]: write through swapped strides.
            strides = (grad_b.stride(0), grad_b.stride(2), grad_b.stride(1))
            _weight_grad(h, grad_out, sorted_rows, reduce_blocks, reduce_offsets, grad_b, strides, rank)
        return grad_x, grad_a, grad_b


@multi_lora_bwd_triton.register_fake
def _(
    grad_out, x, lora_a, lora_b, scaling, h, sorted_rows, blocks, reduce_blocks, reduce_offsets, need_x, need_a, need_b
):
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        lora_a.new_empty(lora_a.shape) if need_a else x.new_empty(0),
        lora_b.new_empty(lora_b.shape) if need_b else x.new_empty(0),
    )


#: The op's Triton kernels by name, for tools that compile or inspect them (the sm_90 resource
#: reports of latentembed.bench.kernels).
KERNELS = {
    "shrink_expand": _shrink_expand_kernel,
    "weight_grad_partial": _weight_grad_partial_kernel,
    "sum_partials": _sum_partials_kernel,
}
