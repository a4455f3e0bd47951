"""Row helpers of pooling, shared by every pooling module: argument checks, packing of the pooled
rows, the sequence of each packed row and the L2 normalisation.

They sit below :mod:`~latentembed.modules.pooling` and the latent-attention blocks
(:mod:`~latentembed.modules.latent_attention`, :mod:`~latentembed.modules.latent_attention_unfolded`),
which all import them; this module imports none of those.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import checks

__all__ = ["check_pool_inputs", "check_pool_mask", "l2_normalize", "pack_pool_rows", "segment_of_row"]


def check_pool_mask(pool_mask: Optional[torch.Tensor], hidden: torch.Tensor, packed: bool) -> None:
    """Check a pool mask against ``hidden``: a bool or integer tensor of shape ``hidden.shape[:-1]``
    ([B, L] padded, [T] packed) on hidden's device. ``None`` (pool everything) passes.

    Example:
        >>> check_pool_mask(torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 3, 8), packed=False)
    """
    if pool_mask is not None:
        checks.check_row_mask("pool_mask", pool_mask, hidden, packed=packed, keeps="pool")


def check_pool_inputs(
    hidden: torch.Tensor,
    pool_mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    *,
    validate: bool = True,
) -> None:
    """The arguments of :func:`~latentembed.modules.pooling.pool`: hidden padded [B, L, D] (B >= 1)
    or packed [T, D] with int32 ``cu_seqlens`` [B+1], and the pool mask of that layout
    (:func:`check_pool_mask`). ``validate`` reads cu_seqlens' values (one host sync)."""
    checks.check_hidden_states(hidden, cu_seqlens, validate=validate)
    check_pool_mask(pool_mask, hidden, packed=cu_seqlens is not None)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows of ``x`` [..., D] scaled to unit L2 norm, in float32 (float64 stays float64), returned
    in x's dtype; an all-zero row (a sequence with nothing pooled) stays zero and gets exactly
    zero gradient, whatever gradient arrives for it.

    Other rows are bitwise ``F.normalize(x.float(), dim=-1).to(x.dtype)``. F.normalize itself
    sends ``g / eps`` (1e12 g) back to a zero row: infinite once rounded to fp16, and NaN as soon
    as it meets the zeros that produced the row (0 * inf in a weight gradient).

    Example:
        >>> l2_normalize(torch.tensor([[3.0, 4.0], [0.0, 0.0]])).tolist()
        [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    acc = x.to(torch.promote_types(x.dtype, torch.float32))
    norm = acc.norm(p=2, dim=-1, keepdim=True)
    # The same division as F.normalize; the where() stops every gradient of a zero row.
    return torch.where(norm > 0, acc / norm.clamp_min(eps), 0.0).to(x.dtype)


def segment_of_row(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] int64: the sequence index of each packed row, for offsets ``cu_seqlens`` [B+1].

    ``total`` must be ``cu_seqlens[-1]``; passing it avoids a device sync.

    Example:
        >>> segment_of_row(torch.tensor([0, 2, 2, 3], dtype=torch.int32), 3).tolist()
        [0, 0, 2]
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths, output_size=total)


def pack_pool_rows(
    hidden: torch.Tensor,
    pool_mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    total: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled rows of each sequence, packed, and their int32 offsets.

    Padded: hidden [B, L, D], pool_mask [B, L] or ``None`` (every position). Packed: hidden
    [T, D], cu_seqlens [B+1] int32, pool_mask [T] or ``None``. Returns ``rows`` [T', D]
    (sequence b is ``rows[cu[b]:cu[b+1]]``, positions in order) and ``cu`` [B+1] int32. A mask
    costs one device sync (the number of kept rows sets the output's size) unless ``total``, the
    number of nonzero mask entries, is given: then nothing is read back (``torch.nonzero_static``);
    a wrong ``total`` drops or repeats rows (the caller checks it). No argument checks.

    Example:
        >>> h = torch.randn(2, 3, 4)
        >>> rows, cu = pack_pool_rows(h, torch.tensor([[0, 1, 1], [1, 0, 0]]))
        >>> rows.shape, cu.tolist()
        (torch.Size([3, 4]), [0, 2, 3])
        >>> torch.equal(pack_pool_rows(h, torch.tensor([[0, 1, 1], [1, 0, 0]]), total=3)[0], rows)
        True
    """
    device = hidden.device
    if cu_seqlens is None:
        B, L, D = hidden.shape
        if pool_mask is None:
            cu = torch.arange(B + 1, device=device, dtype=torch.int32) * L
            return hidden.reshape(B * L, D), cu
        keep = pool_mask != 0
        counts = keep.sum(1)
    else:
        if pool_mask is None:
            return hidden, cu_seqlens
        keep = pool_mask != 0
        B = cu_seqlens.shape[0] - 1
        seq = segment_of_row(cu_seqlens, hidden.shape[0])
        counts = torch.zeros(B, dtype=torch.long, device=device).index_add_(0, seq, keep.long())
    if total is None:
        rows = hidden[keep]
    else:
        index = torch.nonzero_static(keep.reshape(-1), size=total, fill_value=0).reshape(-1)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    cu = torch.zeros(counts.shape[0] + 1, dtype=torch.int32, device=device)
    cu[1:] = counts.cumsum(0)
    return rows, cu
