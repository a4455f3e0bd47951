"""Autograd Functions of the contrastive loss that keep its extra memory linear in B + N.

Each saves only tensors that are alive anyway (the embeddings) plus per-row float32 values,
never float32 [rows, D] copies, and works in row chunks (:func:`row_chunks`) so that no
temporary larger than a chunk is created.
"""

from __future__ import annotations

import torch

__all__ = ["ClampStraightThrough", "OwnedScores", "RowDot", "cosine_normalize", "row_chunks"]


def row_chunks(rows: int, width: int) -> list[slice]:
    """Row slices whose float32 temporaries stay near 64 MiB (``width`` elements per row)."""
    step = max(1, (1 << 24) // max(1, width))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


class RowDot(torch.autograd.Function):
    """``sum_k a[i, k] * b[i, k]`` accumulated in float32 (float64 for float64), chunked so that
    no float32 copy of a [B, D] bf16 input is kept for the backward pass."""

    @staticmethod
    def forward(ctx, a, b):
        acc = torch.promote_types(a.dtype, torch.float32)
        ctx.save_for_backward(a, b)
        return torch.cat([(a[c].to(acc) * b[c].to(acc)).sum(-1) for c in row_chunks(a.shape[0], a.shape[1])])

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        g = grad[:, None]
        grad_a = (g * b.to(g.dtype)).to(a.dtype) if ctx.needs_input_grad[0] else None
        grad_b = (g * a.to(g.dtype)).to(b.dtype) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


class _CosineNormalize(torch.autograd.Function):
    """``x / max(|x|, eps)`` row-wise (F.normalize's semantics and rounding: a division, so rows
    come out bitwise as ``F.normalize(x.float())``, which duplicate masking relies on), computed
    in float32 (float64 for float64) and returned in x's dtype.

    Saves only x itself (alive anyway) and the float32 clamped norms [rows]: autograd through
    ``F.normalize(x.float())`` would keep float32 [rows, D] copies, 3x a bf16 input's size.
    Backward: ``(g - xhat * <g, xhat>) / |x|`` (just ``g / eps`` where the norm was clamped),
    recomputed chunk by chunk in float32."""

    EPS = 1e-12

    @staticmethod
    def forward(ctx, x):
        acc = torch.promote_types(x.dtype, torch.float32)
        out = torch.empty_like(x)
        denom = x.new_empty(x.shape[0], dtype=acc)
        clamped = torch.empty(x.shape[0], dtype=torch.bool, device=x.device)
        for c in row_chunks(x.shape[0], x.shape[1]):
            xc = x[c].to(acc)
            norm = xc.norm(dim=-1)
            clamped[c] = norm < _CosineNormalize.EPS
            denom[c] = norm.clamp_min(_CosineNormalize.EPS)
            out[c] = (xc / denom[c, None]).to(x.dtype)
        ctx.save_for_backward(x, denom, clamped)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, denom, clamped = ctx.saved_tensors
        out = torch.empty_like(x)
        for c in row_chunks(x.shape[0], x.shape[1]):
            g = grad[c].to(denom.dtype)
            xhat = x[c].to(denom.dtype) / denom[c, None]
            radial = torch.where(clamped[c, None], 0.0, (g * xhat).sum(-1, keepdim=True))
            out[c] = ((g - xhat * radial) / denom[c, None]).to(x.dtype)
        return out


def cosine_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [R, D] scaled to unit L2 norm, like ``F.normalize(x.float(), dim=-1).to(x.dtype)``
    but without float32 [R, D] copies saved for backward (see :class:`_CosineNormalize`)."""
    return _CosineNormalize.apply(x)


class OwnedScores(torch.autograd.Function):
    """``[q_i . p_i, q_i . n_i1, ..., q_i . n_ik]`` [B, 1 + k] in float32 (float64 for float64) for
    queries q [B, D], their positives p [B, D] and their own negatives n [B, k, D] (any strides,
    e.g. a view of the documents): batched dots in row chunks, no [B, N] pass and no float32
    copies of the inputs saved for backward."""

    @staticmethod
    def forward(ctx, q, p, n):
        acc = torch.promote_types(q.dtype, torch.float32)
        B, k, D = n.shape
        out = q.new_empty((B, 1 + k), dtype=acc)
        for c in row_chunks(B, (2 + k) * D):
            qc = q[c].to(acc)
            out[c, 0] = (qc * p[c].to(acc)).sum(-1)
            # the same product-and-sum as the positive's (not bmm): a duplicate ties exactly
            out[c, 1:] = (n[c].to(acc) * qc[:, None, :]).sum(-1)
        ctx.save_for_backward(q, p, n)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, p, n = ctx.saved_tensors
        B, k, D = n.shape
        g_q, g_p, g_n = torch.empty_like(q), torch.empty_like(p), torch.empty(n.shape, dtype=n.dtype, device=n.device)
        for c in row_chunks(B, (2 + k) * D):
            g = grad[c]
            qc, nc = q[c].to(g.dtype), n[c].to(g.dtype)
            g_q[c] = (g[:, :1] * p[c].to(g.dtype) + torch.bmm(g[:, None, 1:], nc)[:, 0]).to(q.dtype)
            g_p[c] = (g[:, :1] * qc).to(p.dtype)
            g_n[c] = (g[:, 1:, None] * qc[:, None, :]).to(n.dtype)
        return g_q, g_p, g_n


class ClampStraightThrough(torch.autograd.Function):
    """``x.clamp(lo, hi)`` whose gradient also passes outside the range when a descent step
    (``x - lr * grad``) moves x back towards it, so a parameter that overshot can recover
    (a plain clamp gives it zero gradient forever)."""

    @staticmethod
    def forward(ctx, x, lo: float, hi: float):
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        passes = ((x >= ctx.lo) & (x <= ctx.hi)) | ((x > ctx.hi) & (grad > 0)) | ((x < ctx.lo) & (grad < 0))
        return torch.where(passes, grad, torch.zeros_like(grad)), None, None
