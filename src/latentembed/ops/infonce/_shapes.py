"""Output shapes of the masked-logsumexp ops: the fake (meta) implementations that torch.compile
traces, registered for both the Triton and the CUDA ops (their schemas are the same)."""

from __future__ import annotations

import torch


def fake_forward(q, d, scale, pos_index, pos_score, doc_owner, doc_key, pos_key, threshold, margin, exclude_diagonal):
    """(lse [B] fp32, n_above [B] int64, s_pos [B] fp32, or [0] without pos_index)."""
    B = q.shape[0]
    n_pos = B if pos_index is not None else 0
    return (
        q.new_empty(B, dtype=torch.float32),
        q.new_empty(B, dtype=torch.int64),
        q.new_empty(n_pos, dtype=torch.float32),
    )


def fake_backward(
    grad_lse,
    q,
    d,
    scale,
    lse,
    pos_index,
    pos_score,
    doc_owner,
    doc_key,
    pos_key,
    threshold,
    margin,
    exclude_diagonal,
    subtract_positive,
):
    """(grad_q like q [B, D], grad_d like d [N, D], grad_scale [] fp32)."""
    return torch.empty_like(q), torch.empty_like(d), q.new_empty((), dtype=torch.float32)
