"""Fused masked logsumexp of query-document scores, the core of InfoNCE losses.

Three implementations behind two functions: ``reference`` (plain PyTorch, the spec), ``triton``
and ``cuda`` (the compiled extension). :func:`infonce_lse` returns the logsumexp over each query's
candidates, :func:`infonce_per_query_loss` the per-query InfoNCE loss ``lse - scale * s_pos``.
Which documents are candidates is one :class:`CandidateRule`, carried as one structure from
here to the custom-op calls.
"""

from __future__ import annotations

from numbers import Real
from typing import Optional, Union

import torch

from .. import checks
from ..dispatch import cuda_backend, reference_backend, select_backend, triton_backend
from . import cuda  # defines the CUDA ops' schemas, whether or not the extension is built
from .reference import candidate_mask, infonce_lse_ref, infonce_per_query_loss_ref
from .rule import CandidateRule

__all__ = [
    "BACKENDS",
    "CandidateRule",
    "InfoNCELSEFunction",
    "candidate_mask",
    "infonce_lse",
    "infonce_lse_ref",
    "infonce_per_query_loss",
    "infonce_per_query_loss_ref",
]

BACKENDS = (
    # The Triton kernels use tensor cores; the CUDA ones are the portable fallback.
    cuda_backend(auto=False),
    triton_backend(),
    reference_backend(),
)


def _kernel_ops(backend: str):
    """(forward, backward) ops of a kernel backend."""
    if backend == "triton":
        from . import triton  # on first use: importing triton takes a while

        return triton.infonce_lse_fwd_triton, triton.infonce_lse_bwd_triton
    return cuda.infonce_lse_fwd_cuda, cuda.infonce_lse_bwd_cuda


class InfoNCELSEFunction(torch.autograd.Function):
    """Autograd wrapper over a kernel backend's forward and backward ops.

    ``apply(q, d, scale, rule, per_query_loss, backend)``: q [B, D], d [N, D], scale 0-dim,
    ``rule`` a :class:`CandidateRule` (valid, with pos_key given whenever doc_key is: see
    :func:`infonce_lse`), ``backend`` in ``{"triton", "cuda"}``. Returns ``(lse, n_above)``, or
    ``(lse - scale * s_pos, n_above)`` with ``per_query_loss``; the kernel launchers make
    contiguous what they index. The rule reaches the ops unpacked by keyword.
    """

    @staticmethod
    def forward(ctx, q, d, scale, rule: CandidateRule, per_query_loss: bool, backend: str):
        forward_op, _ = _kernel_ops(backend)
        lse, n_above, s_pos = forward_op(q, d, scale, **rule.keywords())
        ctx.save_for_backward(q, d, scale, lse, *rule.tensors())
        # The tensors travel through save_for_backward; the rest of the rule on ctx.
        ctx.rule = rule.with_tensors([None] * len(rule.tensors()))
        ctx.per_query_loss, ctx.backend = per_query_loss, backend
        ctx.mark_non_differentiable(n_above)
        out = lse - scale.to(torch.float32) * s_pos if per_query_loss else lse
        return out, n_above

    @staticmethod
    def backward(ctx, grad_out, _grad_n_above):
        q, d, scale, lse, *rule_tensors = ctx.saved_tensors
        _, backward_op = _kernel_ops(ctx.backend)
        grad_q, grad_d, grad_scale = backward_op(
            grad_out.contiguous(),
            q,
            d,
            scale,
            lse,
            subtract_positive=ctx.per_query_loss,
            **ctx.rule.with_tensors(rule_tensors).keywords(),
        )
        # rule, per_query_loss and backend get no gradient
        return grad_q, grad_d, grad_scale.to(scale.dtype), None, None, None


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype the scale multiplies scores in: float32 (float64 for float64 input)."""
    return torch.promote_types(q.dtype, torch.float32) if q.dtype.is_floating_point else torch.float32


def _check_scale(scale: Union[torch.Tensor, float], q: torch.Tensor, values: checks.ValueChecks) -> torch.Tensor:
    """The scale as a 0-dim tensor on q's device. A Python number is checked here (no device
    read) and built in the compute dtype, so a float64 input's scale is not rounded to float32
    first; a tensor's value joins ``values`` (one host read for every value check)."""
    name, dtype = "scale (1 / temperature)", _compute_dtype(q)
    if isinstance(scale, Real):
        checks.check_scale_value(name, float(scale), dtype)
        return torch.tensor(float(scale), dtype=dtype, device=q.device)
    checks.check_tensor("scale", scale)
    if scale.ndim != 0 or not scale.dtype.is_floating_point:
        raise ValueError(
            f"scale must be a 0-dim floating tensor (1 / temperature), got shape {tuple(scale.shape)} "
            f"dtype {checks.dtype_name(scale.dtype)}"
        )
    checks.check_same_device("scale", scale, "q", q)
    values.add([scale], lambda value: checks.check_scale_value(name, value, dtype))
    return scale


def _check_embeddings(q: torch.Tensor, d: torch.Tensor) -> None:
    checks.check_tensor("q", q)
    checks.check_tensor("d", d)
    checks.check_floating("q", q)
    checks.check_ndim("q", q, 2, "[B, D]")
    checks.check_ndim("d", d, 2, "[N, D]")
    if d.dtype != q.dtype:
        raise TypeError(f"d must have the dtype of q ({checks.dtype_name(q.dtype)}), got {checks.dtype_name(d.dtype)}")
    checks.check_same_device("d", d, "q", q)
    if d.shape[1] != q.shape[1]:
        raise ValueError(f"q [B, D] and d [N, D] must have the same D, got q {tuple(q.shape)} and d {tuple(d.shape)}")
    if q.shape[0] == 0 or d.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"q and d must be non-empty, got q {tuple(q.shape)} and d {tuple(d.shape)}")


def _check_rule(rule: CandidateRule, q: torch.Tensor, N: int, values: checks.ValueChecks) -> None:
    B = q.shape[0]
    checks.check_index("pos_index", rule.pos_index, B, "[B]", "q", q)
    checks.check_index("doc_owner", rule.doc_owner, N, "[N]", "q", q)
    checks.check_index("doc_key", rule.doc_key, N, "[N]", "q", q)
    checks.check_index("pos_key", rule.pos_key, B, "[B]", "q", q)
    if rule.pos_key is not None and rule.doc_key is None:
        raise ValueError("pos_key (the key of each row's positive) needs doc_key [N] to compare against")
    if rule.doc_key is not None and rule.pos_index is None and rule.pos_key is None:
        raise ValueError(
            "doc_key (drop duplicates of the positive) needs pos_index (pos_key = doc_key[pos_index]) or pos_key [B]"
        )
    if rule.margin is not None:
        if rule.pos_score is None:
            raise ValueError("margin needs pos_score [B] (each query's positive score, detached)")
        checks.check_tensor("pos_score", rule.pos_score)
        if not rule.pos_score.dtype.is_floating_point or tuple(rule.pos_score.shape) != (B,):
            raise ValueError(
                f"pos_score must be a floating tensor of shape [B] = ({B},), got shape "
                f"{tuple(rule.pos_score.shape)} dtype {checks.dtype_name(rule.pos_score.dtype)}"
            )
        checks.check_same_device("pos_score", rule.pos_score, "q", q)
    for name, value in (("threshold", rule.threshold), ("margin", rule.margin)):
        if value is not None and not isinstance(value, Real):
            raise TypeError(f"{name} must be a float or None, got {type(value).__name__}")
    values.index_range("pos_index", rule.pos_index, N)


def _infonce(q, d, scale, rule: CandidateRule, *, per_query_loss: bool, backend: str, validate: bool):
    """Checks, then the chosen backend: the body of both public functions."""
    _check_embeddings(q, d)
    # Reading values syncs with the device: one read for all checks; validate=False skips it.
    values = checks.ValueChecks(enabled=validate)
    scale = _check_scale(scale, q, values)
    _check_rule(rule, q, d.shape[0], values)
    values.run()
    rule = rule.canonical()
    chosen = select_backend("infonce_lse", BACKENDS, backend, q.device, q.dtype)
    if chosen.name == "reference":
        reference = infonce_per_query_loss_ref if per_query_loss else infonce_lse_ref
        return reference(q, d, scale, rule)
    return InfoNCELSEFunction.apply(q.contiguous(), d.contiguous(), scale, rule, per_query_loss, chosen.name)


def infonce_lse(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: Union[torch.Tensor, float],
    *,
    pos_index: Optional[torch.Tensor] = None,
    pos_score: Optional[torch.Tensor] = None,
    doc_owner: Optional[torch.Tensor] = None,
    doc_key: Optional[torch.Tensor] = None,
    pos_key: Optional[torch.Tensor] = None,
    threshold: Optional[float] = None,
    margin: Optional[float] = None,
    exclude_diagonal: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked logsumexp of ``scale * q_i . d_j`` over each query's candidate documents.

    The InfoNCE loss of query i is ``lse[i] - scale * q_i . d_pos[i]`` (see
    :func:`infonce_per_query_loss`, which fuses that subtraction). The kernel backends never
    store the [B, N] score matrix: they recompute score tiles in the backward pass.

    Args:
        q: [B, D] queries; d: [N, D] documents. Same dtype (float32, float16, bfloat16; float64
            with the reference backend) and device. Scores are accumulated in float32.
        scale: 0-dim tensor (or float), 1 / temperature, > 0; may require grad. Used in float32
            (float64 for float64 input), so it must be a normal number of that dtype:
            [1.18e-38, 3.4e38] for float32 (a float is checked always, a tensor by validate).
        pos_index, pos_score, doc_owner, doc_key, pos_key, threshold, margin, exclude_diagonal:
            the candidate rule, see :class:`CandidateRule`: pos_index [B] int64 (the positive,
            always a candidate), pos_score [B] float (needed by margin), doc_owner [N] int64
            (in-batch negatives off), doc_key [N] int64 / pos_key [B] int64 (drop duplicates of
            the positive; doc_key needs pos_index or pos_key), threshold / margin (drop
            candidates scoring above them), exclude_diagonal (drop j == i).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``
            (``LATENTEMBED_BACKEND`` replaces ``"auto"``).
        validate: check values (pos_index in range, a tensor scale positive and within its
            compute dtype's normal range) with one device-to-host read for all of them; skipped
            under torch.compile. validate=False reads nothing back. Shapes, dtypes and devices
            (and a float scale's value) are always checked.

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
    rule = CandidateRule.from_arguments(locals())
    return _infonce(q, d, scale, rule, per_query_loss=False, backend=backend, validate=validate)


def infonce_per_query_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: Union[torch.Tensor, float],
    *,
    pos_index: torch.Tensor,
    pos_score: Optional[torch.Tensor] = None,
    doc_owner: Optional[torch.Tensor] = None,
    doc_key: Optional[torch.Tensor] = None,
    pos_key: Optional[torch.Tensor] = None,
    threshold: Optional[float] = None,
    margin: Optional[float] = None,
    exclude_diagonal: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-query InfoNCE loss ``lse[i] - scale * q_i . d_pos[i]`` [B] and n_above [B].

    Arguments and n_above as :func:`infonce_lse`, with ``pos_index`` [B] int64 required. The
    kernels fold the positive's gradient into their own (cross-entropy's p - onehot), which saves
    the [N, D] zero-filled gradient buffer and the extra passes a separate gather-dot costs under
    autograd, and cancels no two O(scale) float32 terms outside the kernel.

    Example:
        >>> q, d = torch.randn(4, 8), torch.randn(16, 8)
        >>> loss, n_above = infonce_per_query_loss(q, d, 20.0, pos_index=torch.arange(4))
        >>> bool((loss >= 0).all())
        True
    """
    if pos_index is None:
        raise ValueError("infonce_per_query_loss needs pos_index [B] (the positive to subtract), got None")
    rule = CandidateRule.from_arguments(locals())
    return _infonce(q, d, scale, rule, per_query_loss=True, backend=backend, validate=validate)
