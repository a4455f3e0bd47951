"""Masked mean pooling in plain PyTorch: the specification the kernels are tested against."""

from __future__ import annotations

from typing import Optional

import torch


def masked_mean_pool_ref(
    hidden: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Mean of the kept rows of each sequence, accumulated in at least float32.

    Padded: hidden [B, L, D], mask [B, L] (nonzero = keep; ``None`` keeps every position).
    Packed: hidden [T, D], cu_seqlens [B+1] int32 (sequence b is rows cu_seqlens[b]:cu_seqlens[b+1]).
    Returns [B, D] in ``out_dtype`` (default: hidden's dtype), rounded once from the float32 (at
    least) mean; hidden's gradient comes back in hidden's dtype. A sequence with nothing to keep
    gives zeros (not NaN), and
    its rows get zero gradient. Differentiable by autograd; no argument checks (the public
    ``masked_mean_pool`` does those).
    """
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    if cu_seqlens is None:
        if mask is None:
            total = hidden.sum(1, dtype=acc_dtype)
            count = torch.full_like(total[:, :1], hidden.shape[1])
        else:
            keep = mask != 0
            # where(), not a multiply by 0/1: a NaN or inf in a dropped row must not leak into
            # the mean. sum(dtype=) accumulates in fp32 without an fp32 copy of hidden.
            total = torch.where(keep[..., None], hidden, 0).sum(1, dtype=acc_dtype)
            count = keep.sum(1, keepdim=True).to(acc_dtype)
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        batch = lengths.shape[0]
        # output_size avoids a host sync; index_add is differentiable w.r.t. the rows.
        seq_of_row = torch.repeat_interleave(
            torch.arange(batch, device=hidden.device), lengths, output_size=hidden.shape[0]
        )
        total = hidden.new_zeros(batch, hidden.shape[1], dtype=acc_dtype)
        total = total.index_add(0, seq_of_row, hidden.to(acc_dtype))
        count = lengths.to(acc_dtype)[:, None]
    return (total / count.clamp_min(1)).to(hidden.dtype if out_dtype is None else out_dtype)
