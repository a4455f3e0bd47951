"""Pooling of token hidden states into one vector per sequence, every variant behind one interface.

Modes (``POOLING_MODES``), each over the *pooled* positions of a sequence (the pool mask):

* ``"mean"``: their mean.
* ``"last"``: the last one (the EOS token when the pool mask is the attention mask; correct for
  left padding, right padding and packed input alike, since it is found from the mask).
* ``"first"``: the first one (BOS, or the first token after an excluded instruction).
* ``"weighted_mean"``: weights 1..n over the n pooled positions in order, normalised to sum to 1
  (LLM2Vec's weighted mean; later tokens have seen more context in a causal model).
* ``"latent_attention"``: NV-Embed's latent-attention block
  (:class:`~latentembed.modules.latent_attention.LatentAttentionPooling`).

The pool mask is separate from the backbone's attention mask: pass the attention mask with the
instruction positions zeroed to pool only the text while the backbone still attends to the
instruction. A sequence with nothing to pool gives zeros in every mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ..ops import _checks
from ..ops.masked_mean import masked_mean_pool

if TYPE_CHECKING:
    from .latent_attention import LatentAttentionPooling

__all__ = ["POOLING_MODES", "pool", "Pooling", "check_pool_mask", "l2_normalize", "pack_pool_rows", "segment_of_row"]

POOLING_MODES = ("mean", "last", "first", "weighted_mean", "latent_attention")


# The row helpers below are shared with latent_attention.py and latent_attention_reference.py,
# which import this module; so this module imports LatentAttentionPooling only where it is used.


def check_pool_mask(pool_mask: Optional[torch.Tensor], hidden: torch.Tensor, packed: bool) -> None:
    """Check a pool mask against ``hidden``: a bool or integer tensor of shape ``hidden.shape[:-1]``
    ([B, L] padded, [T] packed) on hidden's device. ``None`` (pool everything) passes."""
    if pool_mask is None:
        return
    _checks.check_tensor("pool_mask", pool_mask)
    if pool_mask.dtype.is_floating_point or pool_mask.dtype.is_complex:
        raise TypeError(
            f"pool_mask must be bool or an integer dtype (1 = pool), got "
            f"{_checks.dtype_name(pool_mask.dtype)}; use pool_mask.bool()"
        )
    expected = tuple(hidden.shape[:-1])
    if tuple(pool_mask.shape) != expected:
        what = "[T]" if packed else "[B, L]"
        raise ValueError(
            f"pool_mask shape {tuple(pool_mask.shape)} does not match hidden's {what} = "
            f"{expected} (hidden shape {tuple(hidden.shape)})"
        )
    _checks.check_same_device("pool_mask", pool_mask, "hidden", hidden)


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
    return torch.repeat_interleave(
        torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths, output_size=total
    )


def pack_pool_rows(
    hidden: torch.Tensor,
    pool_mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled rows of each sequence, packed, and their int32 offsets.

    Padded: hidden [B, L, D], pool_mask [B, L] or ``None`` (every position). Packed: hidden
    [T, D], cu_seqlens [B+1] int32, pool_mask [T] or ``None``. Returns ``rows`` [T', D]
    (sequence b is ``rows[cu[b]:cu[b+1]]``, positions in order) and ``cu`` [B+1] int32. A mask
    costs one device sync (the number of kept rows sets the output's size). No argument checks.

    Example:
        >>> h = torch.randn(2, 3, 4)
        >>> rows, cu = pack_pool_rows(h, torch.tensor([[0, 1, 1], [1, 0, 0]]))
        >>> rows.shape, cu.tolist()
        (torch.Size([3, 4]), [0, 2, 3])
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
    rows = hidden[keep]
    cu = torch.zeros(counts.shape[0] + 1, dtype=torch.int32, device=device)
    cu[1:] = counts.cumsum(0)
    return rows, cu


def _check_inputs(hidden: torch.Tensor, pool_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                  validate: bool) -> None:
    _checks.check_tensor("hidden", hidden)
    _checks.check_floating("hidden", hidden)
    if cu_seqlens is not None:
        _checks.check_ndim("hidden", hidden, 2, "[T, D] when cu_seqlens is given")
        _checks.check_same_device("cu_seqlens", cu_seqlens, "hidden", hidden)
        _checks.check_cu_seqlens(cu_seqlens, hidden.shape[0], "hidden", values=validate)
    else:
        _checks.check_ndim("hidden", hidden, 3, "[B, L, D] (or [T, D] with cu_seqlens)")
        if hidden.shape[0] == 0:
            raise ValueError(f"hidden has an empty batch (B = 0), shape {tuple(hidden.shape)}")
    check_pool_mask(pool_mask, hidden, packed=cu_seqlens is not None)


def _pick_rows(rows: torch.Tensor, cu: torch.Tensor, last: bool) -> torch.Tensor:
    """rows[cu[b+1] - 1] (last) or rows[cu[b]] (first) per sequence; zeros for empty ones."""
    start, end = cu[:-1].long(), cu[1:].long()
    index = end - 1 if last else start
    nonempty = end > start
    if rows.shape[0] == 0:  # nothing pooled anywhere; keep the result on the autograd graph
        return rows.new_zeros(start.shape[0], rows.shape[1]) + rows.sum(0)
    picked = rows[index.clamp(0, rows.shape[0] - 1)]
    return torch.where(nonempty[:, None], picked, 0)


def _weighted_mean(rows: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """sum_i i * row_i / (n (n + 1) / 2) over the n rows of each sequence, in float32 or more."""
    acc = torch.promote_types(rows.dtype, torch.float32)
    total = rows.shape[0]
    seq = segment_of_row(cu, total)
    rank = torch.arange(1, total + 1, device=rows.device) - cu[:-1].long()[seq]  # 1..n in each sequence
    n = (cu[1:] - cu[:-1]).to(acc)
    weight = rank.to(acc) / (n * (n + 1) / 2)[seq]
    out = rows.new_zeros(n.shape[0], rows.shape[1], dtype=acc)
    return out.index_add(0, seq, rows.to(acc) * weight[:, None]).to(rows.dtype)


def pool(
    hidden: torch.Tensor,
    pool_mask: Optional[torch.Tensor] = None,
    *,
    mode: str = "mean",
    cu_seqlens: Optional[torch.Tensor] = None,
    latent_attention: Optional[LatentAttentionPooling] = None,
    normalize: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """Pool each sequence's hidden states into one vector.

    Args:
        hidden: padded [B, L, D] or packed [T, D] (with ``cu_seqlens``), float dtype.
        pool_mask: [B, L] (padded) or [T] (packed), bool or integer, nonzero = pool this
            position. ``None`` pools every position (pass the attention mask for padded input).
        mode: one of ``POOLING_MODES`` (see the module docstring).
        cu_seqlens: [B+1] int32 offsets of the packed sequences.
        latent_attention: the :class:`LatentAttentionPooling` module, for mode
            ``"latent_attention"`` (whose own ``normalize`` setting applies).
        normalize: L2-normalise the result (modes other than ``"latent_attention"``).
        validate: check cu_seqlens' values (one device sync).

    Returns:
        [B, D] in hidden's dtype (means accumulate in float32). Differentiable; positions
        outside the pool mask get zero gradient.

    Example:
        >>> h = torch.randn(2, 4, 8)
        >>> left_padded = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
        >>> torch.equal(pool(h, left_padded, mode="last"), h[:, -1])
        True
    """
    if mode not in POOLING_MODES:
        raise ValueError(f"mode must be one of {POOLING_MODES}, got {mode!r}")
    if mode == "latent_attention":
        from .latent_attention import LatentAttentionPooling

        if not isinstance(latent_attention, LatentAttentionPooling):
            raise TypeError(
                "mode 'latent_attention' needs latent_attention=<LatentAttentionPooling module>, "
                f"got {type(latent_attention).__name__}"
            )
        return latent_attention(hidden, pool_mask, cu_seqlens=cu_seqlens, validate=validate)
    _check_inputs(hidden, pool_mask, cu_seqlens, validate)
    if mode == "mean" and (cu_seqlens is None or pool_mask is None):
        # the fused masked-mean kernel reads the padded tensor in place: no packing copy
        out = masked_mean_pool(hidden, pool_mask, cu_seqlens=cu_seqlens, validate=False)
    else:
        rows, cu = pack_pool_rows(hidden, pool_mask, cu_seqlens)
        if mode == "mean":
            out = masked_mean_pool(rows, cu_seqlens=cu, validate=False)
        elif mode == "weighted_mean":
            out = _weighted_mean(rows, cu)
        else:
            out = _pick_rows(rows, cu, last=mode == "last")
    if normalize:
        out = l2_normalize(out)
    return out


class Pooling(nn.Module):
    """One pooling mode as a module; ``"latent_attention"`` owns a LatentAttentionPooling.

    Args:
        mode: one of ``POOLING_MODES``.
        normalize: L2-normalise the output. ``None``: the mode's default (False, except
            NV-Embed's latent attention, which normalises).
        **latent_kwargs: LatentAttentionPooling's arguments (hidden_size, num_latents, ...),
            for mode ``"latent_attention"`` only.

    Forward: ``(hidden, pool_mask=None, *, cu_seqlens=None)`` -> [B, D]; see :func:`pool`.

    Example:
        >>> pooling = Pooling("weighted_mean")
        >>> pooling(torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)).shape
        torch.Size([2, 16])
    """

    def __init__(self, mode: str = "mean", normalize: Optional[bool] = None, **latent_kwargs):
        super().__init__()
        if mode not in POOLING_MODES:
            raise ValueError(f"mode must be one of {POOLING_MODES}, got {mode!r}")
        if latent_kwargs and mode != "latent_attention":
            raise TypeError(f"mode {mode!r} takes no extra arguments, got {sorted(latent_kwargs)}")
        self.mode = mode
        if mode == "latent_attention":
            from .latent_attention import LatentAttentionPooling

            if normalize is not None:
                latent_kwargs["normalize"] = normalize
            self.latent_attention = LatentAttentionPooling(**latent_kwargs)
            self.normalize = self.latent_attention.normalize
        else:
            self.latent_attention = None
            self.normalize = bool(normalize)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, normalize={self.normalize}"

    def forward(
        self,
        hidden: torch.Tensor,
        pool_mask: Optional[torch.Tensor] = None,
        *,
        cu_seqlens: Optional[torch.Tensor] = None,
        validate: bool = True,
    ) -> torch.Tensor:
        return pool(hidden, pool_mask, mode=self.mode, cu_seqlens=cu_seqlens,
                    latent_attention=self.latent_attention, normalize=self.normalize, validate=validate)
