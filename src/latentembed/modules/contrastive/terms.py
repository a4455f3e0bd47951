"""The InfoNCE loss's terms, one small function per similarity direction.

As sentence-transformers keeps them (MultipleNegativesRankingLoss's ``directions``):
``query_to_doc`` (each query against the documents: the loss itself), ``query_to_query`` and
``doc_to_doc`` (GTE's extra in-batch candidates, which join query_to_doc's softmax) and
``doc_to_query`` (each positive against the queries: ``symmetric``, averaged with the rest).
Every logsumexp goes through the fused op, so on a GPU no [B, N] score matrix is stored.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from ...ops.infonce import infonce_lse, infonce_per_query_loss
from .autograd import RowDot
from .gathering import Gathered, gather_candidates
from .layout import Candidates
from .options import InfoNCEOptions

__all__ = ["TERMS", "JOINT_TERMS", "TermInputs", "candidate_loss"]


class TermInputs(NamedTuple):
    """What the terms score, all normalised. queries [B, D] (this rank's); gathered (every
    rank's queries, documents and their keys: :class:`Gathered`); positives [B] (rows of the
    documents); positive_docs [B, D]; owners [N] or None; scale 0-dim; pos_logit [B],
    ``scale * q_i . d+_i`` (for the terms without a positive of their own) or None; pos_score
    [B] detached float32 positive scores (for margin) or None; options."""

    queries: torch.Tensor
    gathered: Gathered
    positives: torch.Tensor
    positive_docs: torch.Tensor
    owners: Optional[torch.Tensor]
    scale: torch.Tensor
    pos_logit: Optional[torch.Tensor]
    pos_score: Optional[torch.Tensor]
    options: InfoNCEOptions

    def rule_options(self) -> dict:
        """The op keywords every term shares. Values were checked once by the loss:
        validate=False saves the op's host syncs."""
        o = self.options
        return dict(pos_score=self.pos_score, threshold=o.threshold, margin=o.margin, backend=o.backend, validate=False)


# Each term returns (per-query loss [B], n_above [B]) as if it were the only one.


def query_to_doc(t: TermInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """lse over the documents minus the positive's logit, both from the op: it folds the
    positive into its gradient (p - 1 at the positive, as cross-entropy does) instead of
    cancelling two O(scale) float32 terms here."""
    g = t.gathered
    return infonce_per_query_loss(
        t.queries,
        g.documents,
        t.scale,
        pos_index=t.positives,
        doc_owner=t.owners,
        doc_key=g.doc_keys,
        **t.rule_options(),
    )


def query_to_query(t: TermInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """s(q_i, q_j) over the other queries; with keys, queries whose positive duplicates d+_i go."""
    g = t.gathered
    lse, n_above = infonce_lse(
        t.queries,
        g.queries,
        t.scale,
        exclude_diagonal=True,
        doc_key=g.query_keys,
        pos_key=g.pos_keys,
        **t.rule_options(),
    )
    return lse - t.pos_logit, n_above


def doc_to_doc(t: TermInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """s(d+_i, d_j) over every document but d+_i itself (and, with keys, its duplicates);
    pos_key names the positive's key where no pos_index is in the set."""
    g = t.gathered
    lse, n_above = infonce_lse(
        t.positive_docs,
        g.documents,
        t.scale,
        exclude_diagonal=True,
        doc_key=g.doc_keys,
        pos_key=g.pos_keys,
        **t.rule_options(),
    )
    return lse - t.pos_logit, n_above


def doc_to_query(t: TermInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Each positive d+_i against the queries, its own query q_i the positive. With owners
    (in-batch negatives off) its only candidate is its query."""
    g = t.gathered
    B = t.queries.shape[0]
    arange = torch.arange(B, device=t.queries.device)
    q_owner = None
    if t.owners is not None:
        q_owner = torch.cat([arange, arange.new_full((g.queries.shape[0] - B,), -1)])
    return infonce_per_query_loss(
        t.positive_docs,
        g.queries,
        t.scale,
        pos_index=arange,
        doc_owner=q_owner,
        doc_key=g.query_keys,
        **t.rule_options(),
    )


TERMS: dict[str, Callable[[TermInputs], tuple[torch.Tensor, torch.Tensor]]] = {
    "query_to_doc": query_to_doc,
    "query_to_query": query_to_query,
    "doc_to_doc": doc_to_doc,
    "doc_to_query": doc_to_query,
}
# One softmax over their candidates together: log(e^(lse - pos) + e^(lse_qq - pos) + ...).
JOINT_TERMS = ("query_to_doc", "query_to_query", "doc_to_doc")


def candidate_loss(
    q: torch.Tensor,
    candidates: Candidates,
    scale: torch.Tensor,
    options: InfoNCEOptions,
    normalize: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query loss [B] and n_above [B] (query_to_doc's rank) of queries q [B, D] (normalised)
    against ``candidates``, every term of ``options.directions`` included."""
    if options.doc_doc:
        candidates = candidates.positives_to_front()
    d = normalize(candidates.documents)
    candidates = candidates._replace(documents=d)
    B = q.shape[0]
    positive_docs = d[:B] if candidates.positives_first else d[candidates.positives]
    pos_score = pos_logit = None
    if options.margin is not None:
        with torch.no_grad():
            pos_score = RowDot.apply(q, positive_docs).float()
    if options.query_query or options.doc_doc:
        pos_logit = scale * RowDot.apply(q, positive_docs)
    inputs = TermInputs(
        q,
        gather_candidates(q, candidates, options),
        candidates.positives,
        positive_docs,
        candidates.owners,
        scale,
        pos_logit,
        pos_score,
        options,
    )
    losses = {name: TERMS[name](inputs) for name in options.directions}
    loss, n_above = losses["query_to_doc"]
    for name in JOINT_TERMS[1:]:
        if name in losses:
            loss = torch.logaddexp(loss, losses[name][0])
    if "doc_to_query" in losses:
        loss = 0.5 * (loss + losses["doc_to_query"][0])
    return loss, n_above
