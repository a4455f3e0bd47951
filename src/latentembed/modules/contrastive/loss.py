"""The InfoNCE loss function: inputs checked, layout resolved, terms scored, reduced.

``loss_i = -log( exp(s(q_i, d+_i) / tau) / sum_{j in C(i)} exp(s(q_i, d_j) / tau) )``, where the
candidate set C(i) holds the positive, the in-batch documents (or only the query's own hard
negatives) minus masked false negatives. :func:`infonce_loss` takes a temperature and every
option as keywords; :func:`infonce_loss_with_scale`, the core both it and
:class:`~latentembed.modules.contrastive.InfoNCELoss` call, takes the scale and an
:class:`InfoNCEOptions`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from ...ops import checks
from .autograd import cosine_normalize
from .layout import check_inputs, resolve_candidates, resolve_owned
from .options import InfoNCEOptions, scale_from_temperature
from .owned import owned_loss
from .terms import candidate_loss

__all__ = ["InfoNCEOutput", "infonce_loss", "infonce_loss_with_scale"]


class InfoNCEOutput(NamedTuple):
    """``loss``: reduced loss (or [B] with ``reduction="none"``); ``rank`` [B] int64: candidates
    scoring strictly above each query's positive (0 = retrieved first); ``accuracy``: 0-dim
    float32, the fraction of queries with rank 0."""

    loss: torch.Tensor
    rank: torch.Tensor
    accuracy: torch.Tensor


def _compute_dtype(queries: torch.Tensor) -> torch.dtype:
    """The dtype of the logits: float32, float64 for float64 inputs."""
    return torch.promote_types(queries.dtype, torch.float32)


def _check_positives(values: checks.ValueChecks, pos_index: Optional[torch.Tensor], N: int, distinct: bool) -> None:
    """pos_index in [0, N) and, where ``distinct`` (doc_doc puts each positive at its query's
    row), no positive shared by two queries: probes for the one host read of ``values``."""
    values.index_range("pos_index", pos_index, N, note=f" (documents has {N} rows)")
    if distinct and pos_index is not None:
        ordered = pos_index.sort().values

        def check(repeated: float) -> None:
            if repeated:
                raise ValueError("doc_doc with an explicit pos_index needs distinct positives per query")

        values.add([(ordered[1:] == ordered[:-1]).any()], check)


def _reduce(
    loss: torch.Tensor, n_above: torch.Tensor, reduction: str, return_stats: bool
) -> Union[torch.Tensor, InfoNCEOutput]:
    out = loss if reduction == "none" else loss.sum() if reduction == "sum" else loss.mean()
    if not return_stats:
        return out
    return InfoNCEOutput(out, n_above, (n_above == 0).float().mean())


def infonce_loss_with_scale(
    queries: torch.Tensor,
    documents: torch.Tensor,
    pos_index: Optional[torch.Tensor] = None,
    *,
    scale: torch.Tensor,
    options: Optional[InfoNCEOptions] = None,
    hard_negatives: Optional[torch.Tensor] = None,
    doc_owner: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
    return_stats: bool = False,
    value_checks: Optional[checks.ValueChecks] = None,
) -> Union[torch.Tensor, InfoNCEOutput]:
    """The InfoNCE loss at a given ``scale`` (1 / temperature): see :func:`infonce_loss`.

    Args:
        scale: 0-dim floating tensor, moved to the queries' device and used in at least their
            compute dtype (float32, float64 for float64 inputs); may require grad. Its value is
            not checked here (:func:`infonce_loss` checks its temperature).
        options: every other option, validated (:class:`InfoNCEOptions`; None: the defaults).
        value_checks: the caller's pending value checks (e.g. a temperature tensor's), run with
            this call's own (index ranges, distinct positives) in one host read.

    Example:
        >>> q, d = torch.randn(4, 8), torch.randn(12, 8)
        >>> infonce_loss_with_scale(q, d, scale=torch.tensor(20.0), options=InfoNCEOptions(symmetric=True)).shape
        torch.Size([])
    """
    options = options if options is not None else InfoNCEOptions()
    N = check_inputs(
        queries,
        documents,
        pos_index,
        hard_negatives=hard_negatives,
        doc_owner=doc_owner,
        doc_ids=doc_ids,
        options=options,
    )
    checks.check_tensor("scale", scale)
    if scale.ndim != 0 or not scale.dtype.is_floating_point:
        raise ValueError(f"scale must be a 0-dim floating tensor, got {scale.dtype} {tuple(scale.shape)}")
    acc = _compute_dtype(queries)
    scale = scale.to(device=queries.device, dtype=torch.promote_types(scale.dtype, acc))
    values = value_checks if value_checks is not None else checks.ValueChecks(enabled=options.validate)
    _check_positives(values, pos_index, N, distinct=options.doc_doc)
    values.run()
    normalize = cosine_normalize if options.similarity == "cos" else (lambda x: x)
    q = normalize(queries)
    layout = dict(hard_negatives=hard_negatives, doc_ids=doc_ids, options=options)
    if not options.in_batch_negatives and pos_index is None:
        # Stage 2 with a layout that says which documents each query owns: score only those.
        owned = resolve_owned(documents, B=queries.shape[0], normalize=normalize, **layout)
        loss, n_above = owned_loss(q, owned, scale, options)
    else:
        candidates = resolve_candidates(queries, documents, pos_index, doc_owner=doc_owner, **layout)
        loss, n_above = candidate_loss(q, candidates, scale, options, normalize)
    return _reduce(loss, n_above, options.reduction, return_stats)


def infonce_loss(
    queries: torch.Tensor,
    documents: torch.Tensor,
    pos_index: Optional[torch.Tensor] = None,
    *,
    hard_negatives: Optional[torch.Tensor] = None,
    negatives_order: str = "blocks",
    temperature: Union[float, torch.Tensor] = 0.05,
    similarity: str = "cos",
    in_batch_negatives: bool = True,
    doc_owner: Optional[torch.Tensor] = None,
    symmetric: bool = False,
    query_query: bool = False,
    doc_doc: bool = False,
    threshold: Optional[float] = None,
    margin: Optional[float] = None,
    mask_duplicates: bool = False,
    doc_ids: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    return_stats: bool = False,
    gather: Optional[bool] = None,
    group=None,
    same_sizes: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> Union[torch.Tensor, InfoNCEOutput]:
    """InfoNCE loss of queries against documents.

    Layouts (B queries, D features):
      - ``documents`` [N, D] and ``pos_index`` [B] int64: document ``pos_index[i]`` is query i's
        positive;
      - ``documents`` [N, D] with ``N = B * (1 + k)`` and no ``pos_index``: B positives followed by
        B*k hard negatives. ``negatives_order="blocks"`` (sentence-transformers' order,
        ``torch.cat([pos, neg_1, ..., neg_k])``): row ``B + j*B + i`` is query i's j-th negative;
        ``"per_query"``: row ``B + i*k + j``. (The order only matters without in-batch negatives.)
      - ``documents`` = positives [B, D] and ``hard_negatives`` [B, k, D] (same dtype as the
        queries; with in-batch negatives they are concatenated into one [N, D] copy, without
        them scored in place).

    Args:
        temperature: float or 0-dim tensor (> 0); logits are ``s * (1 / temperature)`` in float32
            (float64 for float64 inputs), so ``1 / temperature`` must be a normal number of that
            dtype: temperature in [2.94e-39, 8.51e37] for float32. A float is checked always, a
            tensor by ``validate``.
        doc_owner: [N] int64, with ``pos_index`` and ``in_batch_negatives=False``: the query
            owning each document, -1 = none.
        doc_ids: [N] int64 (row order of the concatenated documents): ignore documents whose id
            equals the positive's (as ``mask_duplicates`` does for bitwise-equal rows).
        return_stats: return :class:`InfoNCEOutput` (loss, rank, accuracy) instead of the loss.
        negatives_order, similarity, in_batch_negatives, symmetric, query_query, doc_doc,
            threshold, margin, mask_duplicates, reduction, gather, group, same_sizes, backend,
            validate: the options, each described in :class:`InfoNCEOptions`.

    Returns:
        The loss (float32; float64 for float64 inputs), or an :class:`InfoNCEOutput`.

    Example:
        >>> q, d = torch.randn(4, 8), torch.randn(12, 8)  # 4 positives + 2 negatives each
        >>> infonce_loss(q, d, temperature=0.05).shape
        torch.Size([])
    """
    options = InfoNCEOptions(
        negatives_order=negatives_order,
        similarity=similarity,
        in_batch_negatives=in_batch_negatives,
        symmetric=symmetric,
        query_query=query_query,
        doc_doc=doc_doc,
        threshold=threshold,
        margin=margin,
        mask_duplicates=mask_duplicates,
        reduction=reduction,
        gather=gather,
        group=group,
        same_sizes=same_sizes,
        backend=backend,
        validate=validate,
    )
    checks.check_tensor("queries", queries)
    values = checks.ValueChecks(enabled=validate)
    scale = scale_from_temperature(temperature, _compute_dtype(queries), queries.device, values)
    return infonce_loss_with_scale(
        queries,
        documents,
        pos_index,
        scale=scale,
        options=options,
        hard_negatives=hard_negatives,
        doc_owner=doc_owner,
        doc_ids=doc_ids,
        return_stats=return_stats,
        value_checks=values,
    )
