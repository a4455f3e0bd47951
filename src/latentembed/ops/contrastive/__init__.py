"""Fused masked logsumexp of query-document scores, the core of InfoNCE losses.

Three implementations behind one function: ``reference`` (plain PyTorch, the spec), ``triton``
and ``cuda`` (the compiled extension). See :func:`infonce_lse`.
"""

from __future__ import annotations

from numbers import Real
from typing import Optional, Union

import torch

from .. import _checks
from .._dispatch import cuda_backend, reference_backend, select_backend, triton_backend
from . import cuda  # defines the CUDA ops' schemas, whether or not the extension is built
from .reference import candidate_mask, infonce_lse_ref

__all__ = ["infonce_lse", "infonce_lse_ref", "candidate_mask", "InfoNCELSEFunction", "BACKENDS"]

def _kernels(name: str):
    """(forward, backward) ops of a kernel backend."""
    if name == "triton":
        from . import triton  # on first use: importing triton takes a while

        return triton.infonce_lse_fwd_triton, triton.infonce_lse_bwd_triton
    return cuda.infonce_lse_fwd_cuda, cuda.infonce_lse_bwd_cuda


BACKENDS = (
    # The Triton kernels use tensor cores; the CUDA ones are the portable fallback.
    cuda_backend(auto=False),
    triton_backend(),
    reference_backend(),
)


class InfoNCELSEFunction(torch.autograd.Function):
    """Autograd wrapper over a kernel backend's forward and backward ops.

    ``forward(q, d, scale, pos_index, pos_score, doc_owner, doc_key, pos_key, threshold, margin,
    exclude_diagonal, subtract_positive, backend)`` with ``backend`` in ``{"triton", "cuda"}``;
    arguments are assumed valid (see :func:`infonce_lse`; ``pos_key`` is resolved there: given
    whenever ``doc_key`` is); the kernel launchers make contiguous what they index. Returns
    ``(lse, n_above)`` (``lse - scale * s_pos`` with ``subtract_positive``).
    """

    @staticmethod
    def forward(ctx, q, d, scale, pos_index, pos_score, doc_owner, doc_key, pos_key, threshold, margin,
                exclude_diagonal: bool, subtract_positive: bool, backend: str):
        forward, _ = _kernels(backend)
        lse, n_above, s_pos = forward(
            q, d, scale, pos_index, pos_score, doc_owner, doc_key, pos_key, threshold, margin, exclude_diagonal
        )
        ctx.save_for_backward(q, d, scale, lse, pos_index, pos_score, doc_owner, doc_key, pos_key)
        ctx.options = (threshold, margin, exclude_diagonal, subtract_positive, backend)
        ctx.mark_non_differentiable(n_above)
        out = lse - scale.to(torch.float32) * s_pos if subtract_positive else lse
        return out, n_above

    @staticmethod
    def backward(ctx, grad_out, _grad_n_above):
        q, d, scale, lse, pos_index, pos_score, doc_owner, doc_key, pos_key = ctx.saved_tensors
        threshold, margin, exclude_diagonal, subtract_positive, backend = ctx.options
        _, backward = _kernels(backend)
        grad_q, grad_d, grad_scale = backward(
            grad_out.contiguous(), q, d, scale, lse, pos_index, pos_score, doc_owner, doc_key, pos_key,
            threshold, margin, exclude_diagonal, subtract_positive,
        )
        return (grad_q, grad_d, grad_scale.to(scale.dtype)) + (None,) * 10


def _check_index(name: str, index: Optional[torch.Tensor], length: int, layout: str, ref: torch.Tensor) -> None:
    if index is None:
        return
    _checks.check_tensor(name, index)
    if index.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype int64, got {_checks.dtype_name(index.dtype)}")
    if tuple(index.shape) != (length,):
        raise ValueError(f"{name} must have shape {layout} = ({length},), got {tuple(index.shape)}")
    _checks.check_same_device(name, index, "q", ref)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype the scale multiplies scores in: float32 (float64 for float64 input)."""
    return torch.promote_types(q.dtype, torch.float32) if q.dtype.is_floating_point else torch.float32


def _as_scale(scale: Union[torch.Tensor, float], q: torch.Tensor) -> torch.Tensor:
    if isinstance(scale, Real):
        # A Python number: checked here, no device read later; built in the compute dtype, so a
        # float64 input's scale is not rounded to float32 first.
        dtype = _compute_dtype(q)
        _check_scale_value(float(scale), dtype)
        return torch.tensor(float(scale), dtype=dtype, device=q.device)
    _checks.check_tensor("scale", scale)
    if scale.ndim != 0 or not scale.dtype.is_floating_point:
        raise ValueError(
            f"scale must be a 0-dim floating tensor (1 / temperature), got shape {tuple(scale.shape)} "
            f"dtype {_checks.dtype_name(scale.dtype)}"
        )
    _checks.check_same_device("scale", scale, "q", q)
    return scale


def _check_scale_value(value: float, dtype: torch.dtype) -> None:
    _checks.check_scale_value("scale (1 / temperature)", value, dtype)


def _check_values(scale: torch.Tensor, pos_index: Optional[torch.Tensor], N: int, check_scale: bool,
                  dtype: torch.dtype) -> None:
    """Value checks (scale a normal positive ``dtype`` number, pos_index in [0, N)) with ONE
    device-to-host read for all of them."""
    scalars = []
    if check_scale:
        scalars.append(scale.detach().to(torch.float64).reshape(()))
    if pos_index is not None:
        lo_hi = torch.aminmax(pos_index)
        scalars += [lo_hi.min.to(torch.float64), lo_hi.max.to(torch.float64)]
    if not scalars:
        return
    values = torch.stack(scalars).tolist()  # the one host sync
    if check_scale:
        _check_scale_value(values.pop(0), dtype)
    if pos_index is not None:
        lo, hi = int(values[0]), int(values[1])
        if lo < 0 or hi >= N:
            bad = lo if lo < 0 else hi
            raise ValueError(f"pos_index values must be in [0, N) = [0, {N}), got {bad}")


def _check_args(q, d, scale, pos_index, pos_score, doc_owner, doc_key, pos_key, threshold, margin, validate,
                scale_checked=False):
    _checks.check_tensor("q", q)
    _checks.check_tensor("d", d)
    _checks.check_floating("q", q)
    _checks.check_ndim("q", q, 2, "[B, D]")
    _checks.check_ndim("d", d, 2, "[N, D]")
    if d.dtype != q.dtype:
        raise TypeError(
            f"d must have the dtype of q ({_checks.dtype_name(q.dtype)}), got {_checks.dtype_name(d.dtype)}"
        )
    _checks.check_same_device("d", d, "q", q)
    if d.shape[1] != q.shape[1]:
        raise ValueError(
            f"q [B, D] and d [N, D] must have the same D, got q {tuple(q.shape)} and d {tuple(d.shape)}"
        )
    if q.shape[0] == 0 or d.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"q and d must be non-empty, got q {tuple(q.shape)} and d {tuple(d.shape)}")
    B, N = q.shape[0], d.shape[0]
    _check_index("pos_index", pos_index, B, "[B]", q)
    _check_index("doc_owner", doc_owner, N, "[N]", q)
    _check_index("doc_key", doc_key, N, "[N]", q)
    _check_index("pos_key", pos_key, B, "[B]", q)
    if pos_key is not None and doc_key is None:
        raise ValueError("pos_key (the key of each row's positive) needs doc_key [N] to compare against")
    if doc_key is not None and pos_index is None and pos_key is None:
        raise ValueError(
            "doc_key (drop duplicates of the positive) needs pos_index (pos_key = doc_key[pos_index]) "
            "or pos_key [B]"
        )
    if margin is not None:
        if pos_score is None:
            raise ValueError("margin needs pos_score [B] (each query's positive score, detached)")
        _checks.check_tensor("pos_score", pos_score)
        if not pos_score.dtype.is_floating_point or tuple(pos_score.shape) != (B,):
            raise ValueError(
                f"pos_score must be a floating tensor of shape [B] = ({B},), got shape "
                f"{tuple(pos_score.shape)} dtype {_checks.dtype_name(pos_score.dtype)}"
            )
        _checks.check_same_device("pos_score", pos_score, "q", q)
    for name, value in (("threshold", threshold), ("margin", margin)):
        if value is not None and not isinstance(value, Real):
            raise TypeError(f"{name} must be a float or None, got {type(value).__name__}")
    if validate and not torch.compiler.is_compiling():
        # Reading values syncs with the device: one read for all checks; validate=False skips it.
        _check_values(scale, pos_index, N, check_scale=not scale_checked, dtype=_compute_dtype(q))


def infonce_lse(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: Union[torch.Tensor, float],
    *,
    pos_index: Optional[torch.Tensor] = None,
    pos_score: Optional[torch.Tensor] = None,
    doc_owner: Optional[torch.Tensor] = None,
    doc_key: Optional[torch.Tensor] = None,
    threshold: Optional[float] = None,
    margin: Optional[float] = None,
    exclude_diagonal: bool = False,
    backend: str = "auto",
    validate: bool = True,
    subtract_positive: bool = False,
    pos_key: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked logsumexp of ``scale * q_i . d_j`` over each query's candidate documents.

    The InfoNCE loss of query i is ``lse[i] - scale * q_i . d_pos[i]``. The kernel backends never
    store the [B, N] score matrix: they recompute score tiles in the backward pass.

    Args:
        q: [B, D] queries; d: [N, D] documents. Same dtype (float32, float16, bfloat16; float64
            with the reference backend) and device. Scores are accumulated in float32.
        scale: 0-dim tensor (or float), 1 / temperature, > 0; may require grad. Used in float32
            (float64 for float64 input), so it must be a normal number of that dtype:
            [1.18e-38, 3.4e38] for float32 (a float is checked always, a tensor by validate).
        pos_index: [B] int64, each query's positive document; always a candidate.
        pos_score: [B] float, each query's positive score (detached); needed by ``margin``.
        doc_owner: [N] int64; when given, query i only sees documents with ``doc_owner[j] == i``
            (in-batch negatives off) besides its positive.
        doc_key: [N] int64 document ids; a candidate j other than pos_index[i] is dropped when
            ``doc_key[j] == pos_key[i]`` (an exact duplicate of row i's positive). Needs pos_index
            or pos_key.
        pos_key: [B] int64, the key of row i's positive; needs doc_key. Default
            ``doc_key[pos_index]``. Give it where rows have no pos_index (e.g. GTE's
            document-document term, whose rows are positives that are not among the candidates'
            indices); then every j with ``doc_key[j] == pos_key[i]`` is dropped.
        threshold: drop candidates whose raw score exceeds it.
        margin: drop candidates whose raw score exceeds ``margin * pos_score[i]``.
        exclude_diagonal: drop j == i (query-query or document-document terms).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``
            (``LATENTEMBED_BACKEND`` replaces ``"auto"``).
        validate: check values (pos_index in range, a tensor scale positive and within its
            compute dtype's normal range) with one device-to-host read for all of them; skipped
            under torch.compile. validate=False reads nothing back. Shapes, dtypes and devices
            (and a float scale's value) are always checked.
        subtract_positive: return ``lse - scale * q_i . d_pos[i]``, the per-query InfoNCE loss,
            instead of lse (needs pos_index). The kernels then fold the positive's gradient into
            their own (cross-entropy's p - onehot), which saves the [N, D] zero-filled gradient
            buffer and the extra passes a separate gather-dot costs under autograd.

    Returns:
        ``(lse, n_above)``: lse [B] float32 (float64 for float64 input), ``-inf`` where a query
        has no candidate (zero gradient); n_above [B] int64, the candidates scoring strictly
        above the positive (zeros without pos_index). q, d and scale get lse's gradient.
        The kernels compare each candidate's tensor-core tile score with the positive's score
        from a separate fp32 dot: a candidate tied with the positive (an exact duplicate not
        masked by doc_key) may count as above by rounding noise (at most one fp32 rounding of
        the dot's partial sums). Mask duplicates with doc_key for an exact rank.

    Example:
        >>> q, d = torch.randn(4, 8), torch.randn(16, 8)
        >>> lse, n_above = infonce_lse(q, d, torch.tensor(20.0), pos_index=torch.arange(4))
        >>> lse.shape, n_above.shape
        (torch.Size([4]), torch.Size([4]))
    """
    scale_checked = isinstance(scale, Real)
    scale = _as_scale(scale, q) if isinstance(q, torch.Tensor) else scale
    _check_args(q, d, scale, pos_index, pos_score, doc_owner, doc_key, pos_key, threshold, margin, validate,
                scale_checked)
    if subtract_positive and pos_index is None:
        raise ValueError("subtract_positive needs pos_index (the positive to subtract)")
    threshold = None if threshold is None else float(threshold)
    margin = None if margin is None else float(margin)
    pos_score = pos_score if margin is not None else None
    if doc_key is not None and pos_key is None:
        # The kernels read pos_key [B] instead of looking doc_key[pos_index] up per tile.
        # index_select: no host sync (out-of-range indices fail on the device, or are caught by
        # validate first).
        pos_key = doc_key.index_select(0, pos_index)
    chosen = select_backend("infonce_lse", BACKENDS, backend, q.device, q.dtype)
    if chosen.name == "reference":
        return infonce_lse_ref(
            q, d, scale, pos_index, pos_score, doc_owner, doc_key, threshold, margin, exclude_diagonal,
            subtract_positive, pos_key=pos_key,
        )
    if pos_score is not None:
        pos_score = pos_score.detach().to(torch.float32).contiguous()
    if doc_key is not None:
        doc_key, pos_key = doc_key.contiguous(), pos_key.contiguous()
    return InfoNCELSEFunction.apply(
        q.contiguous(), d.contiguous(), scale, pos_index, pos_score, doc_owner, doc_key, pos_key,
        threshold, margin, exclude_diagonal, subtract_positive, chosen.name,
    )
