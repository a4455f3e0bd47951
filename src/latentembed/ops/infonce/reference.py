"""Masked logsumexp of query-document scores in plain PyTorch: the spec the kernels are tested against.

It builds the full [B, N] score matrix, which is exactly what the kernels avoid; it is meant for
tests, small batches and float64 gradchecks. No argument checks (the public functions do those).
"""

from __future__ import annotations

from typing import Optional

import torch

from .rule import CandidateRule


def candidate_mask(scores: torch.Tensor, rule: CandidateRule) -> torch.Tensor:
    """[B, N] bool: True where document j is in query i's candidate set C(i).

    ``scores`` [B, N] are the raw scores q_i . d_j (before the scale); ``rule`` says which
    documents are dropped (see :class:`CandidateRule`): the positive ``pos_index[i]`` is always a
    candidate, and without pos_index, any j with the row's ``pos_key`` is dropped.
    """
    B, N = scores.shape
    rows = torch.arange(B, device=scores.device)[:, None]
    cols = torch.arange(N, device=scores.device)[None, :]
    keep = torch.ones(B, N, dtype=torch.bool, device=scores.device)
    if rule.doc_owner is not None:
        keep &= rule.doc_owner[None, :] == rows
    if rule.exclude_diagonal:
        keep &= cols != rows
    if rule.threshold is not None:
        keep &= ~(scores > rule.threshold)
    if rule.margin is not None:
        bound = rule.pos_score.to(torch.float32) * rule.margin  # in float32, as the kernels do
        keep &= ~(scores > bound[:, None])
    if rule.doc_key is not None:
        pos_key = rule.pos_key if rule.pos_key is not None else rule.doc_key[rule.pos_index]
        keep &= rule.doc_key[None, :] != pos_key[:, None]
    if rule.pos_index is not None:
        keep |= cols == rule.pos_index[:, None]
    return keep


def _masked_lse(q, d, scale, rule):
    """(lse [B], n_above [B], scores [B, N]) in float32 (float64 for float64 input)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = q.to(acc) @ d.to(acc).T
    keep = candidate_mask(scores.detach(), rule)
    logits = torch.where(keep, scores * scale.to(acc), float("-inf"))
    empty = ~keep.any(1)
    # logsumexp of an all -inf row is -inf with a NaN gradient: take it of zeros instead and
    # put the -inf back through where(), whose gradient to the unused branch is zero.
    lse = torch.logsumexp(torch.where(empty[:, None], 0.0, logits), dim=1)
    lse = torch.where(empty, float("-inf"), lse)
    if rule.pos_index is None:
        n_above = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    else:
        s = scores.detach()
        n_above = ((s > s.gather(1, rule.pos_index[:, None])) & keep).sum(1)
    return lse, n_above, scores


def infonce_lse_ref(
    q: torch.Tensor, d: torch.Tensor, scale: torch.Tensor, rule: Optional[CandidateRule] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over each query's candidates of ``scale * q_i . d_j``, and the positive's rank.

    q [B, D], d [N, D] (scores accumulated in float32, float64 for float64 input), scale a 0-dim
    tensor, candidates by :func:`candidate_mask` (``rule`` None: every document). Returns
    ``(lse, n_above)``: lse [B] in float32
    (float64 for float64 input), ``-inf`` for an empty candidate set (with zero gradient, not NaN);
    n_above [B] int64, the number of candidates scoring strictly above the positive (zeros
    without ``pos_index``). Differentiable in q, d and scale by autograd.

    Example:
        >>> q, d = torch.randn(3, 8), torch.randn(5, 8)
        >>> lse, n_above = infonce_lse_ref(q, d, torch.tensor(2.0), CandidateRule(pos_index=torch.arange(3)))
        >>> lse.shape
        torch.Size([3])
    """
    lse, n_above, _ = _masked_lse(q, d, scale, rule if rule is not None else CandidateRule())
    return lse, n_above


def infonce_per_query_loss_ref(
    q: torch.Tensor, d: torch.Tensor, scale: torch.Tensor, rule: CandidateRule
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-query InfoNCE loss ``lse - scale * q_i . d_pos[i]`` [B] and n_above [B], as
    :func:`infonce_lse_ref` (``rule.pos_index`` required)."""
    lse, n_above, scores = _masked_lse(q, d, scale, rule)
    acc = scores.dtype
    return lse - scale.to(acc) * scores.gather(1, rule.pos_index[:, None])[:, 0], n_above
