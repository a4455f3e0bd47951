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
the [BLOCK, D] gradient accumulators of dq and dd in registers, does not fit. Instead the tile
kernel recomputes the score tiles and writes dS = g_i * (p_ij - [j = pos(i)]) * scale, transposed
(dS^T, one row per document, in the input dtype), and cuBLAS GEMMs consume it: dq = dS d and
dd = dS^T q. Where dS^T lives and how often dq is touched is the memory plan (plan.py): when
B <= D, one launch writes dS^T for every document into the buffer that then receives dd, dq is
ONE GEMM over all N documents written once (no fp32 accumulator), and dd follows in blocks;
when B > D, chunks of documents each get a dS^T block and dq accumulates in fp32. Four matmuls
of 2*B*N*D in all (forward scores, recomputed scores, dq, dd): the floor for not storing
scores. dscale = sum_i g_i sum_j p_ij s_ij is reduced per (group, row) in the tile kernel and
summed in a fixed order: deterministic, no atomics anywhere.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
import triton.testing

from ..dispatch import device_guard, triton_interpreting
from ..tuning import select_configs, size_class
from ._shapes import fake_backward, fake_forward
from .plan import backward_plan
from .rule import CandidateRule

# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) tried by the autotuner on the GPU (H100),
# best guess first, for 16-bit inputs (tensor-core dots) and for fp32 (IEEE dots on the FMA
# units: operands in registers, smaller tiles). Each survives _prune_tiles only where it compiles
# for sm_90 without register spills (tests/ops/compile_infonce_sm90.py, with the Triton of the
# GPU machine, 3.6, and of CI, 3.9): a [128, 128] fp32 score tile is 64 registers a thread at 8
# warps, and the masks and exponentials keep two or three such tiles alive. Dropped after that
# check: 4-warp [128, 128] and [64, 128] tiles and [128, 256] tiles (up to 1.9 KB of spills).
HALF_CONFIGS = [(128, 128, 64, 8, 3), (128, 64, 64, 8, 4)]
FP32_CONFIGS = [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3)]
GPU_CONFIGS = HALF_CONFIGS + FP32_CONFIGS
# The backward's [128, 128] tile spills under Triton 3.9 once any mask beyond the positive is on.
_RULE_MASKS = ("HAS_OWNER", "HAS_KEY", "HAS_THRESHOLD", "HAS_MARGIN", "EXCLUDE_DIAG")
# Document groups are a multiple of every BLOCK_N so that tiles never straddle two groups.
_GPU_GROUP_QUANTUM = 128
_INTERPRETER_TILE = (16, 16, 32)
# Tests shrink these to exercise several groups / chunks at small sizes, and force either memory
# plan; None = automatic.
GROUP_DOCS: Optional[int] = None
CHUNK_DOCS: Optional[int] = None
ONE_PASS: Optional[bool] = None
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


def shipped_configs(fp32: bool, backward: bool, masks: bool) -> list:
    """The (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) tuples the autotuner may try for a
    launch: fp32 or 16-bit input, forward or backward, any rule mask beyond the positive on."""
    if fp32:
        return list(FP32_CONFIGS)
    if backward and masks:
        return [c for c in HALF_CONFIGS if c[1] <= 64]
    return list(HALF_CONFIGS)


def _prune_tiles(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    wanted = shipped_configs(
        args["q_ptr"].dtype == torch.float32, bool(args["BACKWARD"]), any(args[f] for f in _RULE_MASKS)
    )
    key = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages)
    return select_configs([c for c in configs if key(c) in wanted])


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
    EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] fp32 tile of q . d^T, looping over D. Rows / columns past B / N repeat
    the last row's scores (every caller masks them): clamped indices instead of load masks keep
    the pipelined loads free of per-element predicates, which cost registers; with EVEN_D (D a
    multiple of BLOCK_D) the loads are not masked at all."""
    offs_k = tl.arange(0, BLOCK_D)
    q_rows = q_ptr + tl.minimum(offs_m, B - 1)[:, None].to(tl.int64) * stride_q
    d_rows = d_ptr + tl.minimum(offs_n, N - 1)[:, None].to(tl.int64) * stride_d
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + offs_k[None, :]
        if EVEN_D:
            a = tl.load(q_rows + kk)
            b = tl.load(d_rows + kk)
        else:
            a = tl.load(q_rows + kk, mask=kk < D, other=0.0)
            b = tl.load(d_rows + kk, mask=kk < D, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _drop_candidates(
    x,
    s,
    dropped,
    offs_m,
    offs_n,
    g_end,
    doc_owner_ptr,
    doc_key_ptr,
    pos_key,
    bound,
    threshold,
    HAS_OWNER: tl.constexpr,
    HAS_KEY: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    HAS_MARGIN: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr,
):
    """``x`` (a [BLOCK_M, BLOCK_N] tile: logits or kept flags) with ``dropped`` wherever one of
    the rule's masks drops the candidate (the positive is put back by the caller)."""
    if HAS_OWNER:
        owner = tl.load(doc_owner_ptr + offs_n, mask=offs_n < g_end, other=-1)
        x = tl.where(owner[None, :] == offs_m[:, None], x, dropped)
    if EXCLUDE_DIAG:
        x = tl.where(offs_n[None, :] != offs_m[:, None], x, dropped)
    if HAS_THRESHOLD:
        x = tl.where(s > threshold, dropped, x)
    if HAS_MARGIN:
        x = tl.where(s > bound[:, None], dropped, x)
    if HAS_KEY:
        key = tl.load(doc_key_ptr + offs_n, mask=offs_n < g_end, other=0)
        x = tl.where(key[None, :] != pos_key[:, None], x, dropped)
    return x


@triton.autotune(
    configs=_configs(),
    key=[
        "D",
        "TUNE_B",
        "TUNE_N",
        "HAS_POS",
        "HAS_OWNER",
        "HAS_KEY",
        "HAS_THRESHOLD",
        "HAS_MARGIN",
        "EXCLUDE_DIAG",
        "SUB_POS",
        "BACKWARD",
    ],
    prune_configs_by={"early_config_prune": _prune_tiles},
    do_bench=_tuning_bench,
)
@triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
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
    dst_ptr,
    m_part_ptr,
    l_part_ptr,
    c_part_ptr,
    dscale_part_ptr,
    B,
    N,
    D,
    stride_q,
    stride_d,
    stride_dst,
    n_start,
    n_end,
    group,
    threshold,
    TUNE_B,
    TUNE_N,
    HAS_POS: tl.constexpr,
    HAS_OWNER: tl.constexpr,
    HAS_KEY: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    HAS_MARGIN: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr,
    SUB_POS: tl.constexpr,
    BACKWARD: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Score tiles of queries [pid_m block] x documents [one group of n_start..n_end).

    Forward: per-(group, row) partials m, l (online logsumexp) and the count above the positive.
    Backward: dS^T [n_end - n_start, B] (row j - n_start, column i; ``stride_dst`` between rows)
    and per-(group, row) dscale partials. TUNE_B / TUNE_N are the size classes of B and of the
    launch's documents: autotune keys only."""
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < B
    scale = tl.load(scale_ptr).to(tl.float32)
    if HAS_POS:
        pos = tl.load(pos_index_ptr + offs_m, mask=row_ok, other=-1)
        if not BACKWARD:
            spos = tl.load(spos_ptr + offs_m, mask=row_ok, other=0.0)
    pos_key = offs_m  # placeholders for the options that are off (compiled away)
    bound = scale
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
        g_scale = g * scale
        dscale_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        c_i = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for n0 in range(g_start, g_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _score_tile(
            q_ptr, d_ptr, offs_m, offs_n, B, N, D, stride_q, stride_d, PRECISION, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D
        )
        # Registers: a [128, 128] fp32 tile is 64 a thread at 8 warps; every form below was
        # chosen by compiling for sm_90 and reading ptxas' report (tests/ops/compile_infonce_sm90.py).
        in_tile = row_ok[:, None] & (offs_n < g_end)[None, :]
        if BACKWARD:
            # Masks applied to the logits one after the other (-inf: dropped) and the positive
            # put back at the end: only s and the logits are alive at once.
            x = tl.where(in_tile, s * scale, float("-inf"))
            x = _drop_candidates(
                x, s, float("-inf"), offs_m, offs_n, g_end, doc_owner_ptr, doc_key_ptr, pos_key, bound, threshold,
                HAS_OWNER, HAS_KEY, HAS_THRESHOLD, HAS_MARGIN, EXCLUDE_DIAG,
            )  # fmt: skip
            if HAS_POS:
                is_pos = (offs_n[None, :] == pos[:, None]) & in_tile
                x = tl.where(is_pos, s * scale, x)
            p = tl.exp(x - lse[:, None])  # dropped: exp(-inf) = 0; empty rows: lse = +inf
            if SUB_POS:  # loss_i = lse_i - scale * s_pos: cross-entropy's p - onehot
                p = p - tl.where(is_pos, 1.0, 0.0)
            dscale_acc += tl.sum(p * s, axis=1)
            dst_ptrs = dst_ptr + (offs_n - n_start)[None, :].to(tl.int64) * stride_dst + offs_m[:, None]
            tl.store(dst_ptrs, (p * g_scale[:, None]).to(dst_ptr.dtype.element_ty), mask=in_tile)
        else:
            # One boolean tile of kept candidates (fewer registers here than masked logits: the
            # rank needs the kept set and s together).
            keep = _drop_candidates(
                in_tile, s, False, offs_m, offs_n, g_end, doc_owner_ptr, doc_key_ptr, pos_key, bound, threshold,
                HAS_OWNER, HAS_KEY, HAS_THRESHOLD, HAS_MARGIN, EXCLUDE_DIAG,
            )  # fmt: skip
            if HAS_POS:
                is_pos = (offs_n[None, :] == pos[:, None]) & in_tile
                c_i += tl.sum((keep & ~is_pos & (s > spos[:, None])).to(tl.int32), axis=1)
                keep = keep | is_pos
            z = tl.where(keep, s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            # Rows with nothing kept so far keep m = -inf; shift by 0 so no (-inf) - (-inf).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            m_i = m_new
    part = pid_g.to(tl.int64) * B + offs_m  # partials are per launch: [groups, B]
    if BACKWARD:
        tl.store(dscale_part_ptr + part, g * dscale_acc, mask=row_ok)  # sum_j g_i p_ij s_ij
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


def _precision(dtype: torch.dtype) -> str:
    # fp32 input means the caller wants fp32 accuracy: no silent TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _group_docs(B: int, N: int, device: torch.device, sms: Optional[int] = None) -> int:
    """Documents per program: enough groups for ~4 programs per SM (``sms`` SMs, read off the
    device by default), whole multiples of BLOCK_N."""
    quantum = _INTERPRETER_TILE[1] if triton_interpreting() else _GPU_GROUP_QUANTUM
    if GROUP_DOCS is not None:
        return _round_up(GROUP_DOCS, quantum)
    if sms is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    splits = max(1, -(-4 * sms // -(-B // 128)))
    # Never more than _MAX_GRID_YZ groups (the grid's y dimension).
    return _round_up(max(-(-N // splits), -(-N // _MAX_GRID_YZ)), quantum)


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
    dst=None,
    dscale_part=None,
):
    """One launch of the tile kernel over documents [n_start, n_end): the forward when ``parts``
    (m, l, count partials) are given, the backward when ``dst`` (dS^T, [n_end - n_start, B] with
    unit column stride) is. ``bound`` [B] = margin * pos_score."""
    B, D = q.shape
    N = d.shape[0]
    backward = dst is not None
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
        dst_ptr=dst,
        m_part_ptr=m_part,
        l_part_ptr=l_part,
        c_part_ptr=c_part,
        dscale_part_ptr=dscale_part,
        B=B,
        N=N,
        D=D,
        stride_q=q.stride(0),
        stride_d=d.stride(0),
        stride_dst=dst.stride(0) if backward else 0,
        n_start=n_start,
        n_end=n_end,
        group=group,
        threshold=0.0 if rule.threshold is None else rule.threshold,
        TUNE_B=size_class(B),
        TUNE_N=size_class(n_end - n_start),
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


# Whether torch.addmm(acc, a, b, out_dtype=float32, out=acc) accumulates in place on this torch
# (None: not tried yet). The in-place form reads and writes acc once; the fallback adds a
# separate fp32 product (one more [M, Ncol] buffer and pass).
_ADDMM_IN_PLACE: Optional[bool] = None


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc [M, Ncol] fp32 += a [M, K] @ b [K, Ncol], products of 16-bit inputs summed in fp32."""
    global _ADDMM_IN_PLACE
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif not acc.is_cuda:  # CPU (Triton's interpreter in tests): the same exact products, in fp32
        acc.addmm_(a.float(), b.float())
    elif _ADDMM_IN_PLACE is not False:  # cuBLAS: 16-bit operands, fp32 C read and written (torch >= 2.8)
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_IN_PLACE = True
        except RuntimeError:
            if _ADDMM_IN_PLACE:  # it worked before: a real error
                raise
            _ADDMM_IN_PLACE = False
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))


def _storage_view(storage: torch.UntypedStorage, dtype, offset: int, shape) -> torch.Tensor:
    """A contiguous tensor of ``shape`` over ``storage`` from element ``offset``: a base tensor,
    not a view, so autograd and custom_op treat it as a fresh output."""
    stride = (shape[1], 1) if len(shape) == 2 else (1,)
    return torch.empty(0, dtype=dtype, device=storage.device).set_(storage, offset, shape, stride)


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

    Allocates exactly what :func:`~latentembed.ops.infonce.plan.backward_plan` says. At B = 4096,
    N = 16384, D = 4096 in bf16 (one-pass plan): dd's buffer 128 MiB + 8 MiB past its end (dS^T
    lives there first), dq 32 MiB, 16 x 4096 fp32 dscale partials 0.25 MiB: 168.25 MiB in all,
    of which 160 MiB are the gradients themselves. The returned dd keeps the 8 MiB past its end
    alive as long as it lives (its storage is the buffer)."""
    rule = CandidateRule.from_arguments(locals())
    return backward(grad_lse, q, d, scale, lse, rule, subtract_positive=subtract_positive)


def backward(grad_lse, q, d, scale, lse, rule: CandidateRule, *, subtract_positive: bool):
    """The body of :func:`infonce_lse_bwd_triton` (plain Python: tests watch its allocations)."""
    B, D = q.shape
    N = d.shape[0]
    q, d, rule, lse, grad_lse = _kernel_inputs(q, d, rule, lse, grad_lse)
    plan = backward_plan(B, N, D, q.dtype, one_pass=ONE_PASS, chunk=CHUNK_DOCS)
    group = _group_docs(B, plan.chunk, q.device)
    tiles = dict(
        scale=scale.to(torch.float32),
        rule=rule,
        bound=_margin_bound(rule),
        group=group,
        subtract_positive=subtract_positive,
        lse=lse,
        grad=grad_lse,
    )
    buffer = torch.empty(plan.buffer_elements, device=q.device, dtype=q.dtype).untyped_storage()
    grad_d = _storage_view(buffer, q.dtype, 0, (N, D))
    dscale_part = torch.empty(triton.cdiv(plan.chunk, group), B, device=q.device, dtype=torch.float32)
    grad_scale = torch.zeros((), device=q.device, dtype=torch.float64)
    if plan.one_pass:
        dst = _storage_view(buffer, q.dtype, plan.dst_offset, (N, B))  # dS^T, inside and past dd's rows
        with device_guard(q):
            _launch_tiles(q, d, n_start=0, n_end=N, dst=dst, dscale_part=dscale_part, **tiles)
        # float64 for the few B * groups partials: the scalar sums B * N terms.
        grad_scale += dscale_part.sum(dtype=torch.float64)
        grad_q = torch.mm(dst.T, d)  # over all N documents at once: rounded once
        # dd block [a, b) ends (b*D) before the first unread dS^T row, row a (dst_offset + a*B).
        for a in range(0, N, plan.dd_rows):
            b = min(N, a + plan.dd_rows)
            torch.mm(dst[a:b], q, out=grad_d[a:b])
        del dst
    else:
        # dq sums over the chunks in fp32: accumulating in bf16/fp16 would round once per chunk,
        # which fails the error budget. fp32 input accumulates in grad_q itself.
        grad_q = torch.zeros(B, D, device=q.device, dtype=torch.float32)
        ds_buffer = torch.empty(plan.ds_elements, device=q.device, dtype=q.dtype)
        for n0 in range(0, N, plan.chunk):
            n1 = min(N, n0 + plan.chunk)
            dst = ds_buffer[: (n1 - n0) * B].view(n1 - n0, B)
            with device_guard(q):
                _launch_tiles(q, d, n_start=n0, n_end=n1, dst=dst, dscale_part=dscale_part, **tiles)
            grad_scale += dscale_part[: triton.cdiv(n1 - n0, group)].sum(dtype=torch.float64)
            torch.mm(dst, q, out=grad_d[n0:n1])
            _accumulate_mm(grad_q, dst.T, d[n0:n1])
        # The free dS^T buffer is the cast's scratch space: no allocation.
        grad_q = _narrow_in_place(grad_q, q.dtype, ds_buffer)
        del dst, ds_buffer
    return grad_q, grad_d, grad_scale.to(torch.float32)


def _narrow_in_place(acc: torch.Tensor, dtype: torch.dtype, scratch: torch.Tensor) -> torch.Tensor:
    """acc [B, D] fp32 cast to ``dtype`` inside acc's own storage (no second [B, D] buffer).

    The 2-byte result, contiguous, occupies the first half of the storage: row i lands on fp32
    rows [i/2, (i+1)/2), which the row-block loop has already read (blocks go in order and each
    is copied out to ``scratch``, a free 1-D buffer of ``dtype``, first; blocks of one row when it
    holds less than a row). The returned tensor keeps the whole fp32 storage alive."""
    if dtype == acc.dtype:
        return acc
    B, D = acc.shape
    out = _storage_view(acc.untyped_storage(), dtype, 0, (B, D))
    rows = scratch.numel() // D
    if rows == 0:
        scratch, rows = torch.empty(D, dtype=dtype, device=acc.device), 1
    for r0 in range(0, B, rows):
        r1 = min(B, r0 + rows)
        block = scratch[: (r1 - r0) * D].view(r1 - r0, D)
        block.copy_(acc[r0:r1])  # read before any write can reach these rows
        out[r0:r1].copy_(block)
    return out


infonce_lse_bwd_triton.register_fake(fake_backward)

#: The op's Triton kernels by name, for tools that compile or inspect them (the sm_90 resource
#: reports of latentembed.bench.kernels).
KERNELS = {"tile": _infonce_tile_kernel, "positive_score": _positive_score_kernel}


__all__ = ["KERNELS", "backward", "infonce_lse_fwd_triton", "infonce_lse_bwd_triton", "shipped_configs"]
