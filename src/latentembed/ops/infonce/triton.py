"""Triton kernels for the masked logsumexp of query-document scores, forward and backward.

Work layout. One program owns BLOCK_M queries and one *group* of consecutive documents and
walks the group BLOCK_N documents at a time. Each [BLOCK_M, BLOCK_N] score tile is a tl.dot
over D in BLOCK_D chunks (bf16/fp16 tensor-core inputs, fp32 accumulation; IEEE fp32 for fp32
input), so D has no restriction: the tails of D, B and N are masked loads. Splitting the
documents into groups gives enough programs to fill the GPU when B is small (flash-decoding's
trick); the per-group partials (max, sum, count), B * groups numbers, are merged by a few
torch ops in the launcher.

Forward: every mask is applied to the tile in registers, then an online max / sum per row
gives the logsumexp, and a count of candidates above the positive gives its rank.

Backward: D is large for embeddings (4096), so a flash-attention style backward, which keeps
the [BLOCK, D] gradient accumulators of dq and dd in registers, does not fit. Instead the
kernel recomputes the score tiles for a chunk of documents and writes
dS = g_i * p_ij * scale for that chunk only ([B, chunk] in the input dtype, bounded memory),
then two matmuls consume it: dd[chunk] = dS^T q (cuBLAS, written once) and
dq += dS d[chunk] (a Triton matmul accumulating into an fp32 buffer). That is four matmuls of
2*B*N*D in all (forward scores, recomputed scores, dq, dd): the floor for not storing scores.
dscale = sum_i g_i sum_j p_ij s_ij is reduced per (group, row) in the same kernel and summed
per chunk in a fixed order: deterministic, no atomics anywhere.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
import triton.testing

from ..dispatch import device_guard, triton_interpreting
from ._shapes import fake_backward, fake_forward
from .rule import CandidateRule

# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) tried by the autotuner on the GPU (H100).
GPU_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
]
# Document groups are a multiple of every BLOCK_N so that tiles never straddle two groups.
_GPU_GROUP_QUANTUM = 256
_INTERPRETER_TILE = (16, 16, 32)
# Tests shrink these to exercise several groups / chunks at small sizes; None = automatic.
GROUP_DOCS: Optional[int] = None
CHUNK_DOCS: Optional[int] = None
# The dS chunk of the backward holds about this many elements (8 MiB in bf16) ...
_CHUNK_ELEMENTS = 1 << 22
# ... but at least this many documents, so the matmuls that consume it stay compute-bound
# (at B = 4096: [4096 x 1024] @ [1024 x D] and [1024 x 4096] @ [4096 x D], K >= 1024).
# Each chunk's dq matmul also reads and writes the fp32 dq accumulator (2 x 64 MiB at
# B = D = 4096, ~45 us at 2.96 TB/s against ~49 us of tensor-core math per 1024 documents):
# smaller chunks would turn it memory-bound. (Not yet timed on the H100 at this size.)
_MIN_CHUNK_DOCS = 1024
# CUDA's limit on grid dimensions y and z (the document groups of one launch run along y).
_MAX_GRID_YZ = 65535


def _tuning_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _configs():
    if triton_interpreting():  # numpy per program: few, small programs
        bm, bn, bd = _INTERPRETER_TILE
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bm, bn, bd, w, s in GPU_CONFIGS
    ]


@triton.jit
def _score_tile(
    q_ptr,
    d_ptr,
    offs_m,
    offs_n,
    B,
    N,
    D,
    stride_q,
    stride_d,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] fp32 tile of q . d^T, looping over D; rows/cols out of range are 0."""
    offs_k = tl.arange(0, BLOCK_D)
    q_rows = q_ptr + offs_m[:, None].to(tl.int64) * stride_q
    d_rows = d_ptr + offs_n[:, None].to(tl.int64) * stride_d
    m_ok = offs_m[:, None] < B
    n_ok = offs_n[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + offs_k[None, :]
        a = tl.load(q_rows + kk, mask=m_ok & (kk < D), other=0.0)
        b = tl.load(d_rows + kk, mask=n_ok & (kk < D), other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.autotune(
    configs=_configs(),
    key=["D", "HAS_POS", "HAS_OWNER", "HAS_KEY", "HAS_THRESHOLD", "HAS_MARGIN", "EXCLUDE_DIAG", "SUB_POS", "BACKWARD"],
    do_bench=_tuning_bench,
)
@triton.jit
def _infonce_tile_kernel(
    q_ptr,
    d_ptr,
    scale_ptr,
    pos_index_ptr,
    bound_ptr,
    doc_owner_ptr,
    doc_key_ptr,
    pos_key_ptr,
    spos_ptr,
    lse_ptr,
    g_ptr,
    ds_ptr,
    m_part_ptr,
    l_part_ptr,
    c_part_ptr,
    dscale_part_ptr,
    B,
    N,
    D,
    stride_q,
    stride_d,
    stride_ds,
    n_start,
    n_end,
    group,
    threshold,
    HAS_POS: tl.constexpr,
    HAS_OWNER: tl.constexpr,
    HAS_KEY: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    HAS_MARGIN: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr,
    SUB_POS: tl.constexpr,
    BACKWARD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < B
    scale = tl.load(scale_ptr).to(tl.float32)
    if HAS_POS:
        pos = tl.load(pos_index_ptr + offs_m, mask=row_ok, other=-1)
        if not BACKWARD:
            spos = tl.load(spos_ptr + offs_m, mask=row_ok, other=0.0)
    if HAS_KEY:  # the key of each row's positive, resolved by the launcher (doc_key[pos] by default)
        pos_key = tl.load(pos_key_ptr + offs_m, mask=row_ok, other=0)
    if HAS_MARGIN:
        bound = tl.load(bound_ptr + offs_m, mask=row_ok, other=0.0)
    g_start = n_start + pid_g * group
    g_end = tl.minimum(g_start + group, n_end)
    if BACKWARD:
        lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
        # An empty candidate set has lse = -inf: p = exp(z - inf) = 0 instead of NaN.
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        g = tl.load(g_ptr + offs_m, mask=row_ok, other=0.0).to(tl.float32)
        dscale_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        c_i = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for n0 in range(g_start, g_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _score_tile(q_ptr, d_ptr, offs_m, offs_n, B, N, D, stride_q, stride_d, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        in_tile = row_ok[:, None] & (offs_n < g_end)[None, :]
        keep = in_tile
        if HAS_OWNER:
            owner = tl.load(doc_owner_ptr + offs_n, mask=offs_n < g_end, other=-1)
            keep = keep & (owner[None, :] == offs_m[:, None])
        if EXCLUDE_DIAG:
            keep = keep & (offs_n[None, :] != offs_m[:, None])
        if HAS_THRESHOLD:
            keep = keep & ~(s > threshold)
        if HAS_MARGIN:
            keep = keep & ~(s > bound[:, None])
        if HAS_KEY:
            key = tl.load(doc_key_ptr + offs_n, mask=offs_n < g_end, other=0)
            keep = keep & (key[None, :] != pos_key[:, None])
        if HAS_POS:
            is_pos = offs_n[None, :] == pos[:, None]
            keep = keep | (is_pos & in_tile)
        z = s * scale
        if BACKWARD:
            p = tl.where(keep, tl.exp(z - lse[:, None]), 0.0)
            if SUB_POS:  # loss_i = lse_i - scale * s_pos: cross-entropy's p - onehot
                p = p - tl.where(is_pos & in_tile, 1.0, 0.0)
            gp = g[:, None] * p
            dscale_acc += tl.sum(gp * s, axis=1)
            ds_ptrs = ds_ptr + offs_m[:, None].to(tl.int64) * stride_ds + (offs_n - n_start)[None, :]
            tl.store(ds_ptrs, (gp * scale).to(ds_ptr.dtype.element_ty), mask=in_tile)
        else:
            z = tl.where(keep, z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            # Rows with nothing kept so far keep m = -inf; shift by 0 so no (-inf) - (-inf).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            m_i = m_new
            if HAS_POS:
                above = keep & (s > spos[:, None]) & ~is_pos
                c_i += tl.sum(above.to(tl.int32), axis=1)
    part = pid_g.to(tl.int64) * B + offs_m  # partials are per launch: [groups, B]
    if BACKWARD:
        tl.store(dscale_part_ptr + part, dscale_acc, mask=row_ok)
    else:
        tl.store(m_part_ptr + part, m_i, mask=row_ok)
        tl.store(l_part_ptr + part, l_i, mask=row_ok)
        tl.store(c_part_ptr + part, c_i, mask=row_ok)


@triton.jit
def _positive_score_kernel(q_ptr, d_ptr, pos_index_ptr, out_ptr, D, stride_q, stride_d, BLOCK_D: tl.constexpr):
    """out[i] = q_i . d_pos[i] in fp32 (the rank counts candidates strictly above it).

    Its summation order differs from the tensor-core tiles', so a candidate that ties the
    positive exactly (an unmasked duplicate) can count as above it by one rounding; taking
    s_pos from the tile instead would need it before the tiles of other groups are ranked.
    The loss does not depend on it; the rank of a duplicate is documented as noisy."""
    i = tl.program_id(0).to(tl.int64)
    j = tl.load(pos_index_ptr + i)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        a = tl.load(q_ptr + i * stride_q + kk, mask=kk < D, other=0.0).to(tl.float32)
        b = tl.load(d_ptr + j * stride_d + kk, mask=kk < D, other=0.0).to(tl.float32)
        acc += a * b
    tl.store(out_ptr + i, tl.sum(acc, axis=0))


@triton.jit
def _matmul_accumulate_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    K,
    Ncol,
    stride_a,
    stride_b,
    stride_c,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """c [M, Ncol] fp32 += a [M, K] @ b [K, Ncol]: fp32 accumulation across calls."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_c + offs_n[None, :]
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < Ncol)
    acc = tl.load(c_ptrs, mask=c_mask, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(
            a_ptr + offs_m[:, None].to(tl.int64) * stride_a + kk[None, :],
            mask=(offs_m[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            b_ptr + kk[:, None].to(tl.int64) * stride_b + offs_n[None, :],
            mask=(kk[:, None] < K) & (offs_n[None, :] < Ncol),
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(c_ptrs, acc, mask=c_mask)


def _precision(dtype: torch.dtype) -> str:
    # fp32 input means the caller wants fp32 accuracy: no silent TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _group_docs(B: int, N: int, device: torch.device) -> int:
    """Documents per program: enough groups for ~4 programs per SM, whole multiples of BLOCK_N."""
    quantum = _INTERPRETER_TILE[1] if triton_interpreting() else _GPU_GROUP_QUANTUM
    if GROUP_DOCS is not None:
        return _round_up(GROUP_DOCS, quantum)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    splits = max(1, -(-4 * sms // -(-B // 128)))
    # Never more than _MAX_GRID_YZ groups (the grid's y dimension).
    return _round_up(max(-(-N // splits), -(-N // _MAX_GRID_YZ)), quantum)


def _group_docs_backward() -> int:
    quantum = _INTERPRETER_TILE[1] if triton_interpreting() else _GPU_GROUP_QUANTUM
    return _round_up(GROUP_DOCS, quantum) if GROUP_DOCS is not None else quantum


def _chunk_docs(B: int, N: int, group: int) -> int:
    """Documents per backward chunk: a multiple of the group, bounded dS memory, and at most
    _MAX_GRID_YZ groups (one launch's grid y) even when B = 1 asks for 2^22 documents."""
    target = CHUNK_DOCS if CHUNK_DOCS is not None else max(_MIN_CHUNK_DOCS, _CHUNK_ELEMENTS // B)
    return min(_round_up(target, group), _round_up(N, group), _MAX_GRID_YZ * group)


def _launch_tiles(
    q,
    d,
    scale,
    rule: CandidateRule,
    *,
    bound,
    group,
    n_start,
    n_end,
    subtract_positive=False,
    spos=None,
    parts=None,
    lse=None,
    grad=None,
    ds=None,
    dscale_part=None,
):
    """One launch of the tile kernel over documents [n_start, n_end): the forward when ``parts``
    (m, l, count partials) are given, the backward when ``ds`` is. ``bound`` [B] = margin * pos_score."""
    B, D = q.shape
    N = d.shape[0]
    backward = ds is not None
    m_part, l_part, c_part = parts if parts is not None else (None, None, None)
    groups = triton.cdiv(n_end - n_start, group)
    assert groups <= _MAX_GRID_YZ, f"{groups} document groups exceed the grid limit {_MAX_GRID_YZ}"
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), groups)
    _infonce_tile_kernel[grid](
        q_ptr=q,
        d_ptr=d,
        scale_ptr=scale,
        pos_index_ptr=rule.pos_index,
        bound_ptr=bound,
        doc_owner_ptr=rule.doc_owner,
        doc_key_ptr=rule.doc_key,
        pos_key_ptr=rule.pos_key,
        spos_ptr=spos,
        lse_ptr=lse,
        g_ptr=grad,
        ds_ptr=ds,
        m_part_ptr=m_part,
        l_part_ptr=l_part,
        c_part_ptr=c_part,
        dscale_part_ptr=dscale_part,
        B=B,
        N=N,
        D=D,
        stride_q=q.stride(0),
        stride_d=d.stride(0),
        stride_ds=ds.stride(0) if backward else 0,
        n_start=n_start,
        n_end=n_end,
        group=group,
        threshold=0.0 if rule.threshold is None else rule.threshold,
        HAS_POS=rule.pos_index is not None,
        HAS_OWNER=rule.doc_owner is not None,
        HAS_KEY=rule.doc_key is not None,
        HAS_THRESHOLD=rule.threshold is not None,
        HAS_MARGIN=bound is not None,
        EXCLUDE_DIAG=rule.exclude_diagonal,
        SUB_POS=subtract_positive,
        BACKWARD=backward,
        PRECISION=_precision(q.dtype),
    )


def _kernel_inputs(q, d, rule: CandidateRule, *vectors):
    """q, d with unit column stride (the kernels take their row strides only), the rule's index
    vectors and ``vectors`` contiguous (the kernels index them by position; no-ops for the public
    function's arguments) and pos_key resolved (doc_key[pos_index] when omitted)."""
    q = q if q.stride(1) == 1 else q.contiguous()
    d = d if d.stride(1) == 1 else d.contiguous()
    if rule.doc_key is not None and rule.pos_key is None:
        assert rule.pos_index is not None, "doc_key needs pos_index or pos_key"
        rule = rule.with_pos_key()
    rule = rule.with_tensors([None if t is None else t.contiguous() for t in rule.tensors()])
    return (q, d, rule) + tuple(None if v is None else v.contiguous() for v in vectors)


def _margin_bound(rule: CandidateRule) -> Optional[torch.Tensor]:
    # Rounded exactly as the reference: one fp32 multiply.
    return None if rule.margin is None else (rule.pos_score.to(torch.float32) * rule.margin).contiguous()


@torch.library.custom_op("latentembed::infonce_lse_fwd_triton", mutates_args=())
def infonce_lse_fwd_triton(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    pos_index: Optional[torch.Tensor],
    pos_score: Optional[torch.Tensor],
    doc_owner: Optional[torch.Tensor],
    doc_key: Optional[torch.Tensor],
    pos_key: Optional[torch.Tensor],
    threshold: Optional[float],
    margin: Optional[float],
    exclude_diagonal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, D], d [N, D] contiguous -> (lse [B] fp32, n_above [B] int64, s_pos [B] fp32).

    s_pos[i] = q_i . d_pos[i] (the rank compares against it); [0] without pos_index.
    pos_key [B] defaults to doc_key[pos_index] when doc_key is given."""
    B, D = q.shape
    N = d.shape[0]
    q, d, rule = _kernel_inputs(q, d, CandidateRule.from_arguments(locals()))
    group = _group_docs(B, N, q.device)
    groups = triton.cdiv(N, group)
    m_part = torch.empty(groups, B, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    c_part = torch.empty(groups, B, device=q.device, dtype=torch.int32)
    spos = torch.zeros(0, device=q.device, dtype=torch.float32)
    with device_guard(q):
        if rule.pos_index is not None:
            spos = torch.empty(B, device=q.device, dtype=torch.float32)
            _positive_score_kernel[(B,)](
                q_ptr=q,
                d_ptr=d,
                pos_index_ptr=rule.pos_index,
                out_ptr=spos,
                D=D,
                stride_q=q.stride(0),
                stride_d=d.stride(0),
                BLOCK_D=min(1024, triton.next_power_of_2(D)),
            )
        _launch_tiles(
            q,
            d,
            scale.to(torch.float32),
            rule,
            bound=_margin_bound(rule),
            group=group,
            n_start=0,
            n_end=N,
            spos=spos if rule.pos_index is not None else None,
            parts=(m_part, l_part, c_part),
        )
    # Merge the groups: lse = M + log(sum_g l_g exp(m_g - M)); log(0) = -inf for empty rows.
    # In float64 (B * groups numbers): lse is then rounded once, as torch.logsumexp's is, and
    # every p = exp(z - lse) of the backward inherits no extra error.
    m_part, l_part = m_part.double(), l_part.double()
    m_max = m_part.max(0).values
    shift = torch.where(m_max == float("-inf"), 0.0, m_max)
    lse = (shift + torch.log((l_part * torch.exp(m_part - shift)).sum(0))).float()
    return lse, c_part.sum(0, dtype=torch.int64), spos


infonce_lse_fwd_triton.register_fake(fake_forward)


def _accumulate_matmul(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor) -> None:
    """out [M, Ncol] fp32 += a [M, K] @ b [K, Ncol]."""
    M, K = a.shape
    ncol = b.shape[1]
    if triton_interpreting():
        bm, bn, bk, warps, stages = 16, 32, 16, 4, 1
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    grid = (triton.cdiv(M, bm), triton.cdiv(ncol, bn))
    _matmul_accumulate_kernel[grid](
        a_ptr=a,
        b_ptr=b,
        c_ptr=out,
        M=M,
        K=K,
        Ncol=ncol,
        stride_a=a.stride(0),
        stride_b=b.stride(0),
        stride_c=out.stride(0),
        PRECISION=_precision(a.dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=warps,
        num_stages=stages,
    )


@torch.library.custom_op("latentembed::infonce_lse_bwd_triton", mutates_args=())
def infonce_lse_bwd_triton(
    grad_lse: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    lse: torch.Tensor,
    pos_index: Optional[torch.Tensor],
    pos_score: Optional[torch.Tensor],
    doc_owner: Optional[torch.Tensor],
    doc_key: Optional[torch.Tensor],
    pos_key: Optional[torch.Tensor],
    threshold: Optional[float],
    margin: Optional[float],
    exclude_diagonal: bool,
    subtract_positive: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i grad_lse[i] * out[i]: (dq [B, D], dd [N, D], dscale [] fp32), where out
    is lse, or lse - scale * s_pos with subtract_positive. ``lse`` is the forward's logsumexp.

    Extra memory beyond the outputs' 2-byte [B, D] + [N, D]: the fp32 dq accumulator (whose
    storage the 2-byte dq then reuses, see _narrow_in_place) and one [B, chunk] dS. At B = 4096,
    N = 16384, D = 4096 in bf16: dd 128 MiB + dq accumulator 64 MiB (dq lives in its first
    32 MiB) + dS 4096 x 1024 x 2 B = 8 MiB, plus KiB-sized partials: about 200 MiB in all, of
    which 160 MiB are the gradients themselves (a separate cast of dq would add 32 MiB)."""
    B, D = q.shape
    N = d.shape[0]
    q, d, rule, lse, grad_lse = _kernel_inputs(q, d, CandidateRule.from_arguments(locals()), lse, grad_lse)
    # The backward runs chunk by chunk, so its groups are small (one quantum) to give every
    # chunk's launch enough programs; the forward's groups span all of N instead.
    group = _group_docs_backward()
    chunk = _chunk_docs(B, N, group)
    scale32 = scale.to(torch.float32)
    bound = _margin_bound(rule)
    # dq sums over every chunk in fp32: accumulating in bf16/fp16 would round once per chunk,
    # which fails the error budget.
    grad_q = torch.zeros(B, D, device=q.device, dtype=torch.float32)
    grad_d = torch.empty_like(d)
    ds = torch.empty(B, chunk, device=q.device, dtype=q.dtype)
    dscale_part = torch.empty(chunk // group, B, device=q.device, dtype=torch.float32)
    grad_scale = torch.zeros((), device=q.device, dtype=torch.float64)
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        ds_c = ds[:, : n1 - n0]
        with device_guard(q):
            _launch_tiles(
                q,
                d,
                scale32,
                rule,
                bound=bound,
                group=group,
                n_start=n0,
                n_end=n1,
                subtract_positive=subtract_positive,
                lse=lse,
                grad=grad_lse,
                ds=ds,
                dscale_part=dscale_part,
            )
            _accumulate_matmul(ds_c, d[n0:n1], out=grad_q)
        torch.mm(ds_c.T, q, out=grad_d[n0:n1])
        # float64 for the few B * groups partials: the scalar sums B * N terms.
        grad_scale += dscale_part[: triton.cdiv(n1 - n0, group)].sum(dtype=torch.float64)
        del ds_c
    # Both names hold dS's storage (ds_c is a view): drop both before the cast below.
    del ds, dscale_part
    return _narrow_in_place(grad_q, q.dtype, _CHUNK_ELEMENTS // D), grad_d, grad_scale.to(torch.float32)


def _narrow_in_place(acc: torch.Tensor, dtype: torch.dtype, rows: int) -> torch.Tensor:
    """acc [B, D] fp32 cast to ``dtype`` inside acc's own storage (no second [B, D] buffer).

    The 2-byte result, contiguous, occupies the first half of the storage: row i lands on fp32
    rows [i/2, (i+1)/2), which the row-block loop has already read (blocks go in order and each
    is copied out to a temporary first). The returned tensor keeps the whole fp32 storage alive."""
    if dtype == acc.dtype:
        return acc
    B, D = acc.shape
    # A base tensor (not a view) over acc's storage: autograd and custom_op treat it as fresh.
    out = torch.empty(0, dtype=dtype, device=acc.device).set_(acc.untyped_storage(), 0, (B, D), (D, 1))
    rows = max(1, rows)
    for r0 in range(0, B, rows):
        block = acc[r0 : r0 + rows].to(dtype)  # read before any write can reach these rows
        out[r0 : r0 + rows].copy_(block)
    return out


infonce_lse_bwd_triton.register_fake(fake_backward)


__all__ = ["infonce_lse_fwd_triton", "infonce_lse_bwd_triton"]
