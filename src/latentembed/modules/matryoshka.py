"""Matryoshka representation learning (Kusupati et al., 2022): one contrastive loss per nested
prefix of the embedding, so that its first ``k`` dimensions, renormalised, are an embedding on
their own (``EmbeddingModel.encode(..., dim=k)``).

The loss is ``sum_i w_i * loss(prefix(q, k_i), prefix(d, k_i))`` (sentence-transformers'
``MatryoshkaLoss`` rule: a weighted sum, not a mean), where ``prefix(x, k)`` is ``x[..., :k]``
rescaled to unit length when the model normalises its embeddings (a prefix of a unit vector is
shorter than one, and the temperature assumes cosine scores). List the full dimension among the
``dims`` to keep training the whole embedding too.

Example:
    >>> from latentembed.modules.contrastive import InfoNCELoss
    >>> q, d = torch.randn(4, 32), torch.randn(4, 32)
    >>> loss = matryoshka_loss(InfoNCELoss(), q, d, dims=(8, 32), weights=(1.0, 1.0))
    >>> loss.shape
    torch.Size([])
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .pooling_functions import l2_normalize

__all__ = ["check_matryoshka", "embedding_prefix", "matryoshka_loss"]


def check_matryoshka(dims: Sequence[int], weights: Sequence[float], embedding_dim: Optional[int] = None) -> None:
    """Raise ValueError, naming the argument, unless ``dims`` are increasing positive ints (at
    most ``embedding_dim``) and ``weights`` are as many non-negative finite numbers, not all 0
    (empty ``weights``: all 1)."""
    dims, weights = list(dims), list(weights)
    if not dims or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in dims):
        raise ValueError(f"matryoshka dims: expected positive ints, got {dims}")
    if any(b <= a for a, b in zip(dims, dims[1:])):
        raise ValueError(f"matryoshka dims: expected increasing dimensions, got {dims}")
    if embedding_dim is not None and dims[-1] > embedding_dim:
        raise ValueError(f"matryoshka dims: at most the embedding dimension {embedding_dim}, got {dims}")
    if weights:
        if len(weights) != len(dims):
            raise ValueError(f"matryoshka weights: expected one per dim ({len(dims)}), got {len(weights)}: {weights}")
        bad = [w for w in weights if not (isinstance(w, (int, float)) and 0 <= w < float("inf"))]
        if bad or not any(weights):
            raise ValueError(f"matryoshka weights: expected non-negative finite numbers, not all 0, got {weights}")


def embedding_prefix(x: torch.Tensor, k: int, *, normalize: bool = True) -> torch.Tensor:
    """The first ``k`` dimensions of embeddings ``x`` [..., D] -> [..., k], rescaled to unit
    length when ``normalize`` (an all-zero prefix stays zero)."""
    prefix = x[..., :k]
    return l2_normalize(prefix) if normalize else prefix


def matryoshka_loss(
    loss_fn: Callable[..., torch.Tensor],
    queries: torch.Tensor,
    documents: torch.Tensor,
    *,
    dims: Sequence[int],
    weights: Sequence[float] = (),
    normalize: bool = True,
    hard_negatives: Optional[torch.Tensor] = None,
    **kwargs,
) -> torch.Tensor:
    """``sum_i weights[i] * loss_fn(prefix(queries, k_i), prefix(documents, k_i),
    hard_negatives=prefix(hard_negatives, k_i), **kwargs)`` over ``k_i`` in ``dims``.

    Args:
        loss_fn: a contrastive loss such as :class:`~latentembed.modules.contrastive.InfoNCELoss`.
        queries: [B, D]; documents: [N, D]; hard_negatives: [B, k, D] or None.
        dims: increasing prefix lengths, each <= D; weights: one per dim (default all 1).
        normalize: renormalise each prefix (as the model normalises its embeddings).
        kwargs: passed to ``loss_fn`` (``doc_ids``, ``pos_index``, ...).
    Returns:
        The weighted sum [].
    """
    check_matryoshka(dims, weights, queries.shape[-1])
    weights = list(weights) or [1.0] * len(dims)
    total = None
    for k, w in zip(dims, weights):
        hard = None if hard_negatives is None else embedding_prefix(hard_negatives, k, normalize=normalize)
        loss = loss_fn(
            embedding_prefix(queries, k, normalize=normalize),
            embedding_prefix(documents, k, normalize=normalize),
            hard_negatives=hard,
            **kwargs,
        )
        total = w * loss if total is None else total + w * loss
    return total
