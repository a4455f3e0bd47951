"""The three input layouts of the InfoNCE loss, checked and resolved into one structure.

Layouts (B queries, D features): ``documents`` [N, D] with ``pos_index`` [B]; ``documents``
[B * (1 + k), D], B positives then B*k hard negatives (``negatives_order`` "blocks" or
"per_query"); positives [B, D] with ``hard_negatives`` [B, k, D]. Each becomes
:class:`Candidates` (documents, positives, owners, keys), or, for stage 2 without in-batch
negatives where the layout says which documents each query owns, :class:`OwnedCandidates`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from ...ops import checks
from .duplicates import same_rows
from .options import InfoNCEOptions

__all__ = ["Candidates", "OwnedCandidates", "check_inputs", "resolve_candidates", "resolve_owned"]


class Candidates(NamedTuple):
    """Every layout as one structure: the documents the queries are scored against.

    documents: [N, D], positives and negatives in one tensor.
    positives: [B] int64, the row of query i's positive in documents.
    owners: [N] int64, the query owning each document (-1: none) when in-batch negatives are
        off; None: every query sees every document.
    keys: [N] int64 duplicate ids (``doc_ids``), or None.
    positives_first: documents[:B] are the positives in query order (positives is arange(B)).
    """

    documents: torch.Tensor
    positives: torch.Tensor
    owners: Optional[torch.Tensor]
    keys: Optional[torch.Tensor]
    positives_first: bool

    def positives_to_front(self) -> Candidates:
        """The same candidates with query i's positive at row i (one copy of the documents):
        ``exclude_diagonal`` then drops "document i" for query i (the doc_doc term)."""
        if self.positives_first:
            return self
        N, B = self.documents.shape[0], self.positives.shape[0]
        is_pos = torch.zeros(N, dtype=torch.bool, device=self.documents.device)
        is_pos[self.positives] = True
        # the other rows in order, by a stable sort rather than nonzero() (a host sync)
        rest = torch.sort(is_pos.to(torch.uint8), stable=True).indices[: N - B]
        perm = torch.cat([self.positives, rest])
        keys = None if self.keys is None else self.keys[perm]
        arange = torch.arange(B, device=self.documents.device)
        return Candidates(self.documents[perm], arange, self.owners, keys, True)


class OwnedCandidates(NamedTuple):
    """Stage 2 with implied ownership: query i scores only its positive and its own negatives.

    positives: [B, D]; negatives: [B, k, D] (a view where the layout allows); duplicate: [B, k]
    bool, negatives that duplicate their query's positive, or None.
    """

    positives: torch.Tensor
    negatives: torch.Tensor
    duplicate: Optional[torch.Tensor]


def check_embeddings(name: str, x: object, ndim: int, layout: str) -> torch.Tensor:
    """A floating tensor of ``ndim`` dims (``layout`` names them) with at least one row."""
    checks.check_tensor(name, x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row, got shape {tuple(x.shape)}")
    return x


def _check_like_queries(name: str, x: torch.Tensor, queries: torch.Tensor) -> None:
    checks.check_same_device(name, x, "queries", queries)
    if x.dtype != queries.dtype:
        # Casting silently would hide a copy of every document and a precision change.
        raise TypeError(
            f"{name} must have the dtype of queries ({queries.dtype}), got {x.dtype}; cast one of them explicitly"
        )


def check_inputs(queries, documents, pos_index, *, hard_negatives, doc_owner, doc_ids, options: InfoNCEOptions) -> int:
    """Shapes, dtypes and devices of every input tensor, for its layout; returns N, the number
    of documents (positives and negatives together)."""
    check_embeddings("queries", queries, 2, "[B, D]")
    check_embeddings("documents", documents, 2, "[N, D] (or positives [B, D] with hard_negatives)")
    if documents.shape[1] != queries.shape[1]:
        raise ValueError(
            f"queries [B, D] and documents [N, D] must have the same D, got queries "
            f"{tuple(queries.shape)} and documents {tuple(documents.shape)}"
        )
    _check_like_queries("documents", documents, queries)
    B, D = queries.shape
    if hard_negatives is not None:
        check_embeddings("hard_negatives", hard_negatives, 3, "[B, k, D]")
        if tuple(documents.shape) != (B, D) or hard_negatives.shape[0] != B or hard_negatives.shape[2] != D:
            raise ValueError(
                f"with hard_negatives [B, k, D], documents must be the positives [B, D] = ({B}, {D}) "
                f"and hard_negatives ({B}, k, {D}); got documents {tuple(documents.shape)}, "
                f"hard_negatives {tuple(hard_negatives.shape)}"
            )
        _check_like_queries("hard_negatives", hard_negatives, queries)
        if pos_index is not None or doc_owner is not None:
            raise ValueError("pos_index and doc_owner are implied by hard_negatives [B, k, D]; pass neither")
        N = B * (1 + hard_negatives.shape[1])
    elif pos_index is None:
        N = documents.shape[0]
        if N % B:
            raise ValueError(
                f"without pos_index, documents must be B positives followed by B*k hard negatives "
                f"(N a multiple of B = {B}), got N = {N}; pass pos_index [B] for another layout"
            )
        if doc_owner is not None:
            raise ValueError("doc_owner is implied by the positives-then-negatives layout; pass pos_index with it")
    else:
        N = documents.shape[0]
        checks.check_index("pos_index", pos_index, B, "[B]", "queries", queries)
        if options.in_batch_negatives and doc_owner is not None:
            raise ValueError("doc_owner only applies with in_batch_negatives=False")
        if not options.in_batch_negatives:
            if doc_owner is None:
                raise ValueError(
                    "in_batch_negatives=False with an explicit pos_index needs doc_owner [N]: the "
                    "query (row of queries) owning each document, -1 for none"
                )
            checks.check_index("doc_owner", doc_owner, N, "[N]", "queries", queries)
    checks.check_index("doc_ids", doc_ids, N, "[N] (concatenated documents)", "queries", queries)
    return N


def resolve_candidates(
    queries, documents, pos_index, *, hard_negatives, doc_owner, doc_ids, options: InfoNCEOptions
) -> Candidates:
    """The generic structure of any (checked) layout."""
    B, D = queries.shape
    arange = torch.arange(B, device=queries.device)
    in_batch = options.in_batch_negatives
    if hard_negatives is not None:
        k = hard_negatives.shape[1]
        # The op scores one [N, D] document tensor, so in-batch negatives cost this one copy of
        # the documents (stage 2, in_batch_negatives=False, scores the [B, k, D] tensor as is).
        docs = torch.cat([documents, hard_negatives.reshape(B * k, D)])
        owner = torch.cat([arange, arange.repeat_interleave(k)])
        return Candidates(docs, arange, None if in_batch else owner, doc_ids, True)
    if pos_index is None:
        k = documents.shape[0] // B - 1
        neg_owner = arange.repeat(k) if options.negatives_order == "blocks" else arange.repeat_interleave(k)
        owner = None if in_batch else torch.cat([arange, neg_owner])
        return Candidates(documents, arange, owner, doc_ids, True)
    return Candidates(documents, pos_index, None if in_batch else doc_owner, doc_ids, False)


def split_owned(x: torch.Tensor, B: int, order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives [B, ...] and each query's own negatives [B, k, ...] of a positives-first tensor
    (views: no copy)."""
    k = x.shape[0] // B - 1
    rest = x[B:]
    if order == "blocks":  # row B + j*B + i is query i's j-th negative
        return x[:B], rest.unflatten(0, (k, B)).transpose(0, 1)
    return x[:B], rest.unflatten(0, (B, k))


def resolve_owned(
    documents,
    *,
    hard_negatives,
    doc_ids,
    B: int,
    options: InfoNCEOptions,
    normalize: Callable[[torch.Tensor], torch.Tensor],
) -> OwnedCandidates:
    """Positives, own negatives (normalised by ``normalize``) and duplicates of a layout
    without pos_index (the layout implies which documents each query owns)."""
    if hard_negatives is None:
        p, n = split_owned(normalize(documents), B, options.negatives_order)
    else:
        k, D = hard_negatives.shape[1:]
        p, n = normalize(documents), normalize(hard_negatives.reshape(B * k, D)).view(B, k, D)
    duplicate = None
    if doc_ids is not None:
        order = "per_query" if hard_negatives is not None else options.negatives_order
        pos_ids, neg_ids = split_owned(doc_ids, B, order)
        duplicate = neg_ids == pos_ids[:, None]
    elif options.mask_duplicates:
        duplicate = same_rows(p, n)
    return OwnedCandidates(p, n, duplicate)
