"""Stage 2 with implied ownership: each query scores only its positive and its own negatives.

No [B, N] pass and no gather across ranks: [B, 1 + k] scores by batched dots (a query's own
documents are local, and other ranks' documents are never its candidates).
"""

from __future__ import annotations

import torch

from .autograd import OwnedScores
from .layout import OwnedCandidates
from .options import InfoNCEOptions

__all__ = ["owned_loss"]


def owned_loss(
    q: torch.Tensor, owned: OwnedCandidates, scale: torch.Tensor, options: InfoNCEOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query loss [B] and n_above [B] of queries q [B, D] against their owned candidates.

    The same candidate rule as the op (:func:`~latentembed.ops.infonce.candidate_mask`) on the
    [B, 1 + k] scores: the positive always stays; a negative goes when its raw score exceeds
    ``threshold`` or ``margin * s_pos`` (bound in float32) or it duplicates the positive. With
    ``symmetric`` the document-to-query term is 0 (a positive's only candidate is its query),
    so the average halves the loss."""
    scores = OwnedScores.apply(q, owned.positives, owned.negatives)
    s = scores.detach()
    drop = torch.zeros_like(s, dtype=torch.bool)
    if options.threshold is not None:
        drop |= s > options.threshold
    if options.margin is not None:
        drop |= s > (s[:, 0].to(torch.float32) * options.margin)[:, None]
    if owned.duplicate is not None:
        drop[:, 1:] |= owned.duplicate
    drop[:, 0] = False
    logits = scores * scale.to(scores.dtype)
    loss = torch.logsumexp(logits.masked_fill(drop, float("-inf")), dim=1) - logits[:, 0]
    n_above = ((s > s[:, :1]) & ~drop).sum(1)
    if options.symmetric:
        loss = 0.5 * loss
    return loss, n_above
