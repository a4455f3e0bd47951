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

The row helpers that every pooling shares (``check_pool_mask``, ``l2_normalize``,
``pack_pool_rows``, ``segment_of_row``) are in :mod:`~latentembed.modules.pooling_functions`,
below this module and the latent-attention blocks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.masked_mean import masked_mean_pool
from .latent_attention import LatentAttentionPooling
from .pooling_functions import check_pool_inputs, l2_normalize, pack_pool_rows, segment_of_row

__all__ = ["POOLING_MODES", "pool", "Pooling"]

POOLING_MODES = ("mean", "last", "first", "weighted_mean", "latent_attention")


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
        if not isinstance(latent_attention, LatentAttentionPooling):
            raise TypeError(
                "mode 'latent_attention' needs latent_attention=<LatentAttentionPooling module>, "
                f"got {type(latent_attention).__name__}"
            )
        return latent_attention(hidden, pool_mask, cu_seqlens=cu_seqlens, validate=validate)
    check_pool_inputs(hidden, pool_mask, cu_seqlens, validate=validate)
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
        return pool(
            hidden,
            pool_mask,
            mode=self.mode,
            cu_seqlens=cu_seqlens,
            latent_attention=self.latent_attention,
            normalize=self.normalize,
            validate=validate,
        )
