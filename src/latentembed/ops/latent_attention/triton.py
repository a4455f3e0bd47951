"""Triton kernels for the latent-attention block: folded cross-attention and GEGLU segment mean.

Cross-attention tiling (NV-Embed-v2: D = 4096, H = 8 heads, R = 512 latents, T ~ 4.6k rows).
The work is two GEMMs, scores S = LN(x) M^T [T, H*R] and y = x + softmax(S) U, with a per-head
softmax between them. A single flash-style kernel would keep the [BLOCK_T, D] output tile of
D = 4096 fp32 columns in registers (impossible), or recompute the scores once per output D chunk
(32x the score FLOPs). So the forward is split where the data is smallest:
  1. ``_ln_stats_kernel``: mean and rstd of every row (8 bytes a row);
  2. ``_scores_softmax_kernel``: one program per (head, BLOCK_T rows) normalises x tiles on load
     (the LayerNorm never reaches memory), accumulates the [BLOCK_T, R] scores over D with
     tl.dot in fp32, takes the softmax over all R latents at once (R <= 512, so a row's scores
     fit) and stores the probabilities P [T, H*R] in x's dtype: as large as x for NV-Embed
     (H*R = 4096), an eighth of the [T, 32768] queries of the unfolded block, and half of what
     fp32 scores for a separate softmax kernel would write (and then read back);
  3. ``y = addmm(x, P, U_flat)``: a plain GEMM with the residual fused (beta = 1), by cuBLAS.
P is kept for the backward, which then needs no recomputation of the scores:
  dP = dy U_flat^T is a cuBLAS GEMM with an fp32 result (``mm(out_dtype=float32)``, torch >= 2.8),
  and ``_softmax_bwd_kernel`` forms dS = P * (dP - rowsum_h(P * dP)) per head, as the CUDA
  backend does. (A fused kernel that kept dP in registers needs two fp32 [BLOCK_T, R] tiles at
  once: at R = 512 every configuration spilled for sm_90.) dLN = dS M_flat and dU = P^T dy are
  cuBLAS GEMMs; dM = dS^T LN(x) is ``_dm_kernel``, which normalises x on load, so LN(x) is never
  stored; ``_ln_bwd_kernel`` ends with the LayerNorm backward plus the residual gradient and
  per-block partial sums of the LayerNorm weight and bias gradients.
The score kernels run on a 1-D grid of H * row blocks with the head fastest
(``pid = row_block * H + head``), so the H programs of one row block run together and read the
same x tile from L2; and the row blocks stay on axis 0, whose limit is 2^31 - 1 (axes 1 and 2
stop at 65,535 blocks, about a million rows).

GEGLU segment mean: one program per (sequence, BLOCK_F features) walks the sequence's rows like
the packed masked mean (no atomics, deterministic); the backward recomputes gelu from ``a``.

The launchers are torch custom ops with fake implementations, so torch.compile traces them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing

from ..dispatch import device_guard, triton_interpreting
from ..tuning import select_configs, size_class
from ._shapes import grad_a_shape, segment_mean_shape


def _tuning_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _configs(interpreted: dict, gpu: list, *, pruned: bool = False):
    """Interpreter: one config. GPU: ``gpu`` ((meta, warps, stages), best guess first); kernels
    with a pruning function (``pruned``) apply the autotune mode there, the others here."""
    if triton_interpreting():  # numpy per program: one config, few programs
        return [triton.Config(interpreted, num_warps=4)]
    return [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in (gpu if pruned else select_configs(gpu))]


def score_tile_fits(block_t: int, block_r: int, num_warps: int) -> bool:
    """The fp32 [BLOCK_T, BLOCK_R] score tile at <= 128 registers a thread."""
    return block_t * block_r <= 128 * 32 * num_warps


def _prune_row_tiles(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    kept = [c for c in configs if score_tile_fits(c.kwargs["BLOCK_T"], args["BLOCK_R"], c.num_warps)]
    return select_configs(kept or configs[:1])


def _prune_score_tiles(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    wanted = SCORE_FP32_CONFIGS if args["x_ptr"].dtype == torch.float32 else SCORE_HALF_CONFIGS
    key = lambda c: (c.kwargs["BLOCK_T"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages)
    return _prune_row_tiles([c for c in configs if key(c) in wanted], named_args, **kwargs)


# (BLOCK_T, BLOCK_D, num_warps, num_stages) of the score kernel, best guess first, for 16-bit
# inputs (tensor cores) and for fp32 (IEEE dots on the FMA units, operands in registers). Each
# one that survives the pruning compiles for sm_90 without spills at every R from 16 to 512
# (tests/ops/compile_latent_attention_sm90.py). Dropped after that check: 16-bit 32- and 16-row
# tiles (130-460 B of spills at R = 512) and every 16-bit tile for fp32 input (up to 40 KB, and
# 305 KiB of shared memory at R = 512).
SCORE_HALF_CONFIGS = [(64, 32, 8, 3), (64, 64, 8, 3)]
SCORE_FP32_CONFIGS = [(16, 16, 4, 2)]
_SCORE_GPU = [({"BLOCK_T": bt, "BLOCK_D": bd}, w, s) for bt, bd, w, s in SCORE_HALF_CONFIGS + SCORE_FP32_CONFIGS]


# ----------------------------------------------------------------------------- forward


@triton.autotune(
    configs=_configs(
        {"BLOCK_T": 32, "BLOCK_D": 128},
        [({"BLOCK_T": t, "BLOCK_D": d}, 4, 2) for t, d in [(8, 512), (16, 256), (4, 1024)]],
    ),
    key=["D", "TUNE_T"],
    do_bench=_tuning_bench,
)
@triton.jit
def _ln_stats_kernel(
    x_ptr, mean_ptr, rstd_ptr, T, D, stride_xt, eps, TUNE_T, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xt
    total = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        total += tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
    mean = tl.sum(total, axis=1) / D
    # Second pass over the (cached) rows: the variance of centred values, no cancellation.
    sq = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < D)[None, :]
        xc = tl.load(x_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32) - mean[:, None]
        xc = tl.where(ok, xc, 0.0)
        sq += xc * xc
    rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=1) / D + eps)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _normalized_tile(x_ptr, w_ptr, b_ptr, mean, rstd, rows, row_ok, cols, D, stride_xt):
    """LN(x) on a [rows, cols] tile, fp32; zero outside the matrix."""
    col_ok = cols < D
    x = tl.load(
        x_ptr + rows.to(tl.int64)[:, None] * stride_xt + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    xn = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
    return tl.where(row_ok[:, None] & col_ok[None, :], xn, 0.0)


@triton.jit
def _rows_times_head(
    a_ptr,
    stride_at,
    rows,
    row_ok,
    mat_ptr,
    R,
    D,
    acc,
    NORMALIZE: tl.constexpr,
    w_ptr,
    b_ptr,
    mean,
    rstd,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """acc [BLOCK_T, BLOCK_R] += A[rows] @ mat[:R]^T over D, A = LN(x) or a plain matrix."""
    lat = tl.arange(0, BLOCK_R)
    lat_ok = lat < R
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        mt = tl.load(
            mat_ptr + lat.to(tl.int64)[:, None] * D + cols[None, :], mask=lat_ok[:, None] & col_ok[None, :], other=0.0
        )
        if NORMALIZE:
            a = _normalized_tile(a_ptr, w_ptr, b_ptr, mean, rstd, rows, row_ok, cols, D, stride_at)
        else:
            a = tl.load(
                a_ptr + rows.to(tl.int64)[:, None] * stride_at + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
        a = a.to(mt.dtype)
        if IEEE:  # fp32 inputs: full-precision products, not TF32
            acc = tl.dot(a, tl.trans(mt), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(mt), acc)
    return acc


@triton.autotune(
    configs=_configs({"BLOCK_T": 32, "BLOCK_D": 64}, _SCORE_GPU, pruned=True),
    key=["D", "BLOCK_R", "TUNE_T"],
    prune_configs_by={"early_config_prune": _prune_score_tiles},
    do_bench=_tuning_bench,
)
@triton.jit
def _scores_softmax_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    m_ptr,
    mean_ptr,
    rstd_ptr,
    p_ptr,
    T,
    D,
    H,
    R,
    stride_xt,
    stride_pt,
    TUNE_T,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    h = tl.program_id(0) % H
    rows = (tl.program_id(0) // H) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
    acc = _rows_times_head(
        x_ptr,
        stride_xt,
        rows,
        row_ok,
        m_ptr + h.to(tl.int64) * R * D,
        R,
        D,
        acc,
        True,
        w_ptr,
        b_ptr,
        mean,
        rstd,
        IEEE,
        BLOCK_R,
        BLOCK_D,
    )
    lat = tl.arange(0, BLOCK_R)
    scores = tl.where((lat < R)[None, :], acc, float("-inf"))
    e = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    probs = e / tl.sum(e, axis=1)[:, None]
    tl.store(
        p_ptr + rows.to(tl.int64)[:, None] * stride_pt + h * R + lat[None, :],
        probs.to(p_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (lat < R)[None, :],
    )


def _is_ieee(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32


def _block_r(R: int) -> int:
    return max(16, triton.next_power_of_2(R))  # tl.dot needs every dim >= 16


def _head_row_grid(H: int, T: int):
    """1-D grid of the score kernels: one program per (row block, head), head fastest."""
    return lambda meta: (H * triton.cdiv(T, meta["BLOCK_T"]),)


@torch.library.custom_op("latentembed::latent_attn_fwd_triton", mutates_args=())
def latent_attn_fwd_triton(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    m: torch.Tensor,
    u: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, D], m/u [H, R, D] in x's dtype -> (y [T, D], P [T, H*R], mean, rstd [T])."""
    # Indexed by shape (x may have any row stride); no-ops for the public function's arguments.
    m, u, ln_weight, ln_bias = (t.contiguous() for t in (m, u, ln_weight, ln_bias))
    x = x if x.stride(1) == 1 else x.contiguous()
    T, D = x.shape
    H, R, _ = m.shape
    mean = torch.empty(T, device=x.device, dtype=torch.float32)
    rstd = torch.empty(T, device=x.device, dtype=torch.float32)
    probs = torch.empty(T, H * R, device=x.device, dtype=x.dtype)
    if T > 0:
        with device_guard(x):
            _ln_stats_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)](
                x, mean, rstd, T, D, x.stride(0), eps, size_class(T)
            )
            _scores_softmax_kernel[_head_row_grid(H, T)](
                x,
                ln_weight,
                ln_bias,
                m,
                mean,
                rstd,
                probs,
                T,
                D,
                H,
                R,
                x.stride(0),
                probs.stride(0),
                size_class(T),
                IEEE=_is_ieee(x),
                BLOCK_R=_block_r(R),
            )
    with torch.autocast(x.device.type, enabled=False):
        y = torch.addmm(x, probs, u.view(H * R, D))
    return y, probs, mean, rstd


@latent_attn_fwd_triton.register_fake
def _(x, ln_weight, ln_bias, m, u, eps):
    T = x.shape[0]
    stats = x.new_empty(T, dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(T, m.shape[0] * m.shape[1]), stats, stats.new_empty(T)


# ----------------------------------------------------------------------------- backward


# (BLOCK_T, num_warps) of the softmax backward: rows of one head per program, bandwidth-bound.
_SOFTMAX_BWD_GPU = [({"BLOCK_T": t}, w, 1) for t, w in [(8, 4), (16, 8), (4, 4)]]


@triton.autotune(
    configs=_configs({"BLOCK_T": 16}, _SOFTMAX_BWD_GPU, pruned=True),
    key=["BLOCK_R", "TUNE_T"],
    prune_configs_by={"early_config_prune": _prune_row_tiles},
    do_bench=_tuning_bench,
)
@triton.jit
def _softmax_bwd_kernel(
    p_ptr,
    dp_ptr,
    ds_ptr,
    T,
    H,
    R,
    stride_pt,
    stride_dpt,
    TUNE_T,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """dS_h = P_h * (dP_h - rowsum(P_h * dP_h)) for BLOCK_T rows of head h, in fp32."""
    h = tl.program_id(0) % H
    rows = (tl.program_id(0) // H) * BLOCK_T + tl.arange(0, BLOCK_T)
    lat = tl.arange(0, BLOCK_R)
    ok = (rows < T)[:, None] & (lat < R)[None, :]
    offs = rows.to(tl.int64)[:, None] * stride_pt + h * R + lat[None, :]
    p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dp = tl.load(dp_ptr + rows.to(tl.int64)[:, None] * stride_dpt + h * R + lat[None, :], mask=ok, other=0.0)
    dp = dp.to(tl.float32)
    ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=ok)


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result: cuBLAS with 16-bit operands and an fp32 output on CUDA
    (``torch.mm(..., out_dtype=torch.float32)``, torch >= 2.8), the same products summed in fp32
    on CPU (the interpreter's tests)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


# (BLOCK_N, BLOCK_D, BLOCK_T, num_warps, num_stages) of dM = dS^T LN(x), for 16-bit inputs
# (tensor cores) and for fp32 (IEEE dots on the FMA units, operands in registers: the 16-bit
# tiles spilled 9 KB a thread there). All compile for sm_90 without spills.
DM_HALF_CONFIGS = [(128, 128, 32, 8, 3), (128, 64, 64, 4, 3), (64, 128, 32, 4, 3), (128, 128, 64, 8, 3)]
DM_FP32_CONFIGS = [(64, 64, 16, 8, 3), (64, 64, 16, 4, 3), (32, 64, 16, 4, 3)]


def _prune_dm_tiles(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    wanted = DM_FP32_CONFIGS if args["ds_ptr"].dtype == torch.float32 else DM_HALF_CONFIGS
    key = lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"], c.kwargs["BLOCK_T"], c.num_warps, c.num_stages)
    return select_configs([c for c in configs if key(c) in wanted])


@triton.autotune(
    configs=_configs(
        {"BLOCK_N": 32, "BLOCK_D": 64, "BLOCK_T": 32},
        [({"BLOCK_N": n, "BLOCK_D": d, "BLOCK_T": t}, w, s) for n, d, t, w, s in DM_HALF_CONFIGS + DM_FP32_CONFIGS],
        pruned=True,
    ),
    key=["D", "N", "TUNE_T"],
    prune_configs_by={"early_config_prune": _prune_dm_tiles},
    do_bench=_tuning_bench,
)
@triton.jit
def _dm_kernel(
    ds_ptr,
    x_ptr,
    w_ptr,
    b_ptr,
    mean_ptr,
    rstd_ptr,
    dm_ptr,
    T,
    D,
    N,
    stride_st,
    stride_xt,
    TUNE_T,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """dM_flat [N = H*R, D] = dS^T LN(x), LN applied to x tiles on load."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = n < N
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        ds = tl.load(
            ds_ptr + rows.to(tl.int64)[:, None] * stride_st + n[None, :],
            mask=row_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        xn = _normalized_tile(x_ptr, w_ptr, b_ptr, mean, rstd, rows, row_ok, cols, D, stride_xt)
        if IEEE:
            acc = tl.dot(tl.trans(ds), xn.to(ds.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(ds), xn.to(ds.dtype), acc)
    tl.store(
        dm_ptr + n.to(tl.int64)[:, None] * D + cols[None, :],
        acc.to(dm_ptr.dtype.element_ty),
        mask=n_ok[:, None] & (cols < D)[None, :],
    )


@triton.jit
def _ln_bwd_kernel(
    dy_ptr,
    dxn_ptr,
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dw_ptr,
    db_ptr,
    T,
    D,
    stride_t,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dx = dy + LayerNorm backward of dxn; partial dw, db [num_row_blocks, D] in fp32."""
    blk = tl.program_id(0)
    rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    base = rows.to(tl.int64)[:, None] * stride_t
    mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    c1 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)  # sum_d g * xhat, g = dxn * w
    c2 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)  # sum_d g
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < D)[None, :]
        xhat = (tl.load(x_ptr + base + cols[None, :], mask=ok, other=0.0).to(tl.float32) - mean[:, None]) * rstd[
            :, None
        ]
        g = (
            tl.load(dxn_ptr + base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            * tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        )
        c1 += tl.where(ok, g * xhat, 0.0)
        c2 += g
    c1s = tl.sum(c1, axis=1) / D
    c2s = tl.sum(c2, axis=1) / D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        ok = row_ok[:, None] & col_ok[None, :]
        xhat = (tl.load(x_ptr + base + cols[None, :], mask=ok, other=0.0).to(tl.float32) - mean[:, None]) * rstd[
            :, None
        ]
        xhat = tl.where(ok, xhat, 0.0)
        dxn = tl.load(dxn_ptr + base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        g = dxn * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        dy = tl.load(dy_ptr + base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dx = dy + rstd[:, None] * (g - c2s[:, None] - xhat * c1s[:, None])
        tl.store(dx_ptr + base + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
        tl.store(dw_ptr + blk.to(tl.int64) * D + cols, tl.sum(dxn * xhat, axis=0), mask=col_ok)
        tl.store(db_ptr + blk.to(tl.int64) * D + cols, tl.sum(dxn, axis=0), mask=col_ok)


@torch.library.custom_op("latentembed::latent_attn_bwd_triton", mutates_args=())
def latent_attn_bwd_triton(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    m: torch.Tensor,
    u: torch.Tensor,
    probs: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    need_dm: bool,
    need_du: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, d ln_weight, d ln_bias, dm, du) from grad_y [T, D] and the saved forward.

    ``need_dm``/``need_du`` False skip a [H*R, D] x T GEMM each (frozen, cached M and U) and
    return an empty tensor in their place."""
    # The kernels index m, u, P, mean and rstd by their shapes and share one row stride among
    # grad_y, x and dx; no-ops for the public function's (contiguous) arguments.
    grad_y, x, m, u, probs, ln_weight, ln_bias, mean, rstd = (
        t.contiguous() for t in (grad_y, x, m, u, probs, ln_weight, ln_bias, mean, rstd)
    )
    T, D = x.shape
    H, R, _ = m.shape
    N = H * R
    ds = torch.empty(T, N, device=x.device, dtype=x.dtype)
    dm = torch.empty(N, D, device=x.device, dtype=m.dtype) if need_dm else m.new_empty(0)
    dx = torch.empty_like(x)
    if T > 0:
        with torch.autocast(x.device.type, enabled=False):
            dp = mm_fp32_out(grad_y, u.view(N, D).t())  # [T, N] fp32: the softmax sees it unrounded
        with device_guard(x):
            _softmax_bwd_kernel[_head_row_grid(H, T)](
                probs, dp, ds, T, H, R, probs.stride(0), dp.stride(0), size_class(T), BLOCK_R=_block_r(R)
            )
        del dp
    if need_dm:
        with device_guard(x):
            _dm_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(D, meta["BLOCK_D"]))](
                ds, x, ln_weight, ln_bias, mean, rstd, dm, T, D, N, ds.stride(0), x.stride(0), size_class(T),
                IEEE=_is_ieee(x),
            )  # fmt: skip
        dm = dm.view(H, R, D)
    with torch.autocast(x.device.type, enabled=False):
        dxn = torch.mm(ds, m.view(N, D))
        du = torch.mm(probs.t(), grad_y).view(H, R, D) if need_du else u.new_empty(0)
    # One partial row of dw/db per row block. Not autotuned: the number of partial rows depends
    # on the block size, and a tuning run with another block size would leave stale rows.
    block_t, block_d, warps = (32, 128, 4) if triton_interpreting() else (16, 256, 4)
    blocks = triton.cdiv(T, block_t)
    dw_part = torch.empty(blocks, D, device=x.device, dtype=torch.float32)
    db_part = torch.empty(blocks, D, device=x.device, dtype=torch.float32)
    if T > 0:
        with device_guard(x):
            _ln_bwd_kernel[(blocks,)](
                grad_y,
                dxn,
                x,
                ln_weight,
                mean,
                rstd,
                dx,
                dw_part,
                db_part,
                T,
                D,
                x.stride(0),
                BLOCK_T=block_t,
                BLOCK_D=block_d,
                num_warps=warps,
            )
    dw = dw_part.sum(0).to(ln_weight.dtype)
    db = db_part.sum(0).to(ln_bias.dtype)
    return dx, dw, db, dm, du


@latent_attn_bwd_triton.register_fake
def _(grad_y, x, ln_weight, ln_bias, m, u, probs, mean, rstd, need_dm, need_du):
    return (
        x.new_empty(x.shape),
        ln_weight.new_empty(ln_weight.shape),
        ln_bias.new_empty(ln_bias.shape),
        m.new_empty(m.shape if need_dm else (0,)),
        u.new_empty(u.shape if need_du else (0,)),
    )


# ----------------------------------------------------------------------------- GEGLU segment mean


@triton.jit
def _gelu_parts(g):
    """(gelu(g), gelu'(g)) in fp32, exact erf gelu."""
    cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
    pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
    return g * cdf, cdf + g * pdf


_GEGLU_GPU = [
    ({"BLOCK_L": bl, "BLOCK_F": bf}, w, 2) for bl, bf, w in [(8, 256, 4), (16, 256, 8), (8, 512, 8), (32, 128, 4)]
]


@triton.autotune(
    configs=_configs({"BLOCK_L": 32, "BLOCK_F": 128}, _GEGLU_GPU),
    key=["F", "TUNE_T", "TUNE_B"],
    do_bench=_tuning_bench,
)
@triton.jit
def _geglu_mean_fwd_kernel(
    a_ptr, cu_ptr, out_ptr, F, stride_at, stride_ob, TUNE_T, TUNE_B, BLOCK_L: tl.constexpr, BLOCK_F: tl.constexpr
):
    b = tl.program_id(0)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = f < F
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_L, BLOCK_F], tl.float32)
    for row0 in range(start, end, BLOCK_L):
        rows = row0 + tl.arange(0, BLOCK_L)
        ok = (rows < end)[:, None] & f_ok[None, :]
        ptrs = a_ptr + rows[:, None] * stride_at + f[None, :]
        v = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(ptrs + F, mask=ok, other=0.0).to(tl.float32)
        act, _ = _gelu_parts(g)
        acc += v * act
    n = tl.maximum(end - start, 1).to(tl.float32)
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ob + f, (tl.sum(acc, axis=0) / n).to(out_ptr.dtype.element_ty), mask=f_ok
    )


@triton.autotune(
    configs=_configs({"BLOCK_L": 32, "BLOCK_F": 128}, _GEGLU_GPU),
    key=["F", "TUNE_T", "TUNE_B"],
    do_bench=_tuning_bench,
)
@triton.jit
def _geglu_mean_bwd_kernel(
    grad_out_ptr,
    a_ptr,
    cu_ptr,
    grad_a_ptr,
    F,
    stride_gob,
    stride_at,
    stride_gt,
    TUNE_T,
    TUNE_B,
    BLOCK_L: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    b = tl.program_id(0)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = f < F
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    # A division like the reference's autograd of total / count.
    go = tl.load(grad_out_ptr + b.to(tl.int64) * stride_gob + f, mask=f_ok, other=0.0).to(tl.float32)
    go = go / tl.maximum(end - start, 1).to(tl.float32)
    for row0 in range(start, end, BLOCK_L):
        rows = row0 + tl.arange(0, BLOCK_L)
        ok = (rows < end)[:, None] & f_ok[None, :]
        offs = rows[:, None] * stride_at + f[None, :]
        v = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(a_ptr + offs + F, mask=ok, other=0.0).to(tl.float32)
        act, dact = _gelu_parts(g)
        goffs = rows[:, None] * stride_gt + f[None, :]
        tl.store(grad_a_ptr + goffs, (go[None, :] * act).to(grad_a_ptr.dtype.element_ty), mask=ok)
        tl.store(grad_a_ptr + goffs + F, (go[None, :] * v * dact).to(grad_a_ptr.dtype.element_ty), mask=ok)


def _geglu_grid(batch: int, F: int):
    return lambda meta: (batch, triton.cdiv(F, meta["BLOCK_F"]))


@torch.library.custom_op("latentembed::geglu_segment_mean_fwd_triton", mutates_args=())
def geglu_segment_mean_fwd_triton(a: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """a [T, 2F] (any row stride), cu_seqlens [B+1] int32 -> [B, F] in a's dtype."""
    a = a if a.stride(1) == 1 else a.contiguous()
    cu_seqlens = cu_seqlens.contiguous()
    batch, F = segment_mean_shape(a, cu_seqlens)
    out = torch.empty(batch, F, device=a.device, dtype=a.dtype)
    with device_guard(a):
        _geglu_mean_fwd_kernel[_geglu_grid(batch, F)](
            a, cu_seqlens, out, F, a.stride(0), out.stride(0), size_class(a.shape[0]), size_class(batch)
        )
    return out


@geglu_segment_mean_fwd_triton.register_fake
def _(a, cu_seqlens):
    return a.new_empty(segment_mean_shape(a, cu_seqlens))


@torch.library.custom_op("latentembed::geglu_segment_mean_bwd_triton", mutates_args=())
def geglu_segment_mean_bwd_triton(grad_out: torch.Tensor, a: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """grad_out [B, F] -> grad of a [T, 2F], contiguous; every row is written (valid cu_seqlens)."""
    a = a if a.stride(1) == 1 else a.contiguous()
    grad_out, cu_seqlens = grad_out.contiguous(), cu_seqlens.contiguous()
    grad_a = torch.empty(grad_a_shape(grad_out, a.shape[0]), device=a.device, dtype=a.dtype)
    batch, F = grad_out.shape
    with device_guard(a):
        _geglu_mean_bwd_kernel[_geglu_grid(batch, F)](
            grad_out,
            a,
            cu_seqlens,
            grad_a,
            F,
            grad_out.stride(0),
            a.stride(0),
            grad_a.stride(0),
            size_class(a.shape[0]),
            size_class(batch),
        )
    return grad_a


@geglu_segment_mean_bwd_triton.register_fake
def _(grad_out, a, cu_seqlens):
    return a.new_empty(grad_a_shape(grad_out, a.shape[0]))


#: The op's Triton kernels by name, for tools that compile or inspect them (the sm_90 resource
#: reports of latentembed.bench.kernels).
KERNELS = {
    "ln_stats": _ln_stats_kernel,
    "scores_softmax": _scores_softmax_kernel,
    "softmax_bwd": _softmax_bwd_kernel,
    "dm": _dm_kernel,
    "ln_bwd": _ln_bwd_kernel,
    "geglu_fwd": _geglu_mean_fwd_kernel,
    "geglu_bwd": _geglu_mean_bwd_kernel,
}
