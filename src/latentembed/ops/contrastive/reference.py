"""Masked logsumexp of query-document scores in plain PyTorch: the spec the kernels are tested against.

It builds the full [B, N] score matrix, which is exactly what the kernels avoid; it is meant for
tests, small batches and float64 gradchecks.
"""

from __future__ import annotations

from typing import Optional

import torch


def candidate_mask(
    scores: torch.Tensor,
    pos_index: Optional[torch.Tensor] = None,
    pos_score: Optional[torch.Tensor] = None,
    doc_owner: Optional[torch.Tensor] = None,
    doc_key: Optional[torch.Tensor] = None,
    threshold: Optional[float] = None,
    margin: Optional[float] = None,
    exclude_diagonal: bool = False,
    pos_key: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[B, N] bool: True where document j is in query i's candidate set C(i).

    ``scores`` [B, N] are the raw scores q_i . d_j (before the scale). The positive
    ``pos_index[i]`` is always a candidate; any other j is dropped when
    ``doc_owner[j] != i``, ``exclude_diagonal and j == i``, ``scores[i, j] > threshold``,
    ``scores[i, j] > margin * pos_score[i]`` (the bound is computed in float32, as the kernels do)
    or ``doc_key[j] == pos_key[i]``, where ``pos_key`` [B] defaults to ``doc_key[pos_index]``
    (without pos_index, any j with the row's key is dropped).
    """
    B, N = scores.shape
    rows = torch.arange(B, device=scores.device)[:, None]
    cols = torch.arange(N, device=scores.device)[None, :]
    keep = torch.ones(B, N, dtype=torch.bool, device=scores.device)
    if doc_owner is not None:
        keep &= doc_owner[None, :] == rows
    if exclude_diagonal:
        keep &= cols != rows
    if threshold is not None:
        keep &= ~(scores > threshold)
    if margin is not None:
        bound = pos_score.to(torch.float32) * margin
        keep &= ~(scores > bound[:, None])
    if doc_key is not None:
        if pos_key is None:
            pos_key = doc_key[pos_index]
        keep &= doc_key[None, :] != pos_key[:, None]
    if pos_index is not None:
        keep |= cols == pos_index[:, None]
    return keep


def infonce_lse_ref(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    pos_index: Optional[torch.Tensor] = None,
    pos_score: Optional[torch.Tensor] = None,
    doc_owner: Optional[torch.Tensor] = None,
    doc_key: Optional[torch.Tensor] = None,
    threshold: Optional[float] = None,
    margin: Optional[float] = None,
    exclude_diagonal: bool = False,
    subtract_positive: bool = False,
    pos_key: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over each query's candidates of ``scale * q_i . d_j``, and the positive's rank.

    q [B, D], d [N, D] (scores accumulated in float32, float64 for float64 input), scale a 0-dim
    tensor. Masks as in :func:`candidate_mask` (``pos_key`` included). Returns ``(lse, n_above)``: lse [B] in float32
    (float64 for float64 input), ``-inf`` for an empty candidate set (with zero gradient, not NaN);
    n_above [B] int64, the number of candidates scoring strictly above the positive (zeros
    without ``pos_index``). ``subtract_positive`` returns ``lse - scale * s_pos`` instead (the
    per-query InfoNCE loss; needs pos_index). Differentiable in q, d and scale by autograd; no argument checks (the
    public ``infonce_lse`` does those).
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = q.to(acc) @ d.to(acc).T
    keep = candidate_mask(
        scores.detach(), pos_index, pos_score, doc_owner, doc_key, threshold, margin, exclude_diagonal,
        pos_key=pos_key,
    )
    logits = torch.where(keep, scores * scale.to(acc), float("-inf"))
    empty = ~keep.any(1)
    # logsumexp of an all -inf row is -inf with a NaN gradient: take it of zeros instead and
    # put the -inf back through where(), whose gradient to the unused branch is zero.
    lse = torch.logsumexp(torch.where(empty[:, None], 0.0, logits), dim=1)
    lse = torch.where(empty, float("-inf"), lse)
    if pos_index is None:
        n_above = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    else:
        s = scores.detach()
        s_pos = s.gather(1, pos_index[:, None])
        n_above = ((s > s_pos) & keep).sum(1)
        if subtract_positive:
            lse = lse - scale.to(acc) * scores.gather(1, pos_index[:, None])[:, 0]
    return lse, n_above
