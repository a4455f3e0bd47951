"""Cross-rank gathering of the loss's candidates, and the duplicate keys that go with them."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..distributed import all_gather_no_grad, all_gather_with_grad, distributed_world, gather_sizes
from .duplicates import duplicate_keys
from .layout import Candidates
from .options import InfoNCEOptions

__all__ = ["Gathered", "gather_candidates"]


class Gathered(NamedTuple):
    """The candidates of every rank, this rank's rows first (``rotate=True``).

    queries: [B_all, D] every rank's queries (this rank's alone unless a term scores queries:
        query_query, symmetric); documents: [N_all, D]; gradients flow back to their ranks.
    doc_keys: [N_all] int64 duplicate keys of documents, or None (no duplicate masking).
    pos_keys: [B] the key of each local query's positive; query_keys: [B_all] the same for
        every rank's queries (a query whose positive duplicates d+_i is a false negative of the
        terms whose candidates are queries). Both None without doc_keys.
    """

    queries: torch.Tensor
    documents: torch.Tensor
    doc_keys: Optional[torch.Tensor]
    pos_keys: Optional[torch.Tensor]
    query_keys: Optional[torch.Tensor]


def gather_candidates(q: torch.Tensor, candidates: Candidates, options: InfoNCEOptions) -> Gathered:
    """Gather queries q [B, D] and ``candidates.documents`` (normalised) from every rank of
    ``options.group`` when ``options.gather`` says so (None: whenever there are several ranks).
    Stage 2 with explicit owners gathers nothing (owners index local queries only)."""
    B, N = q.shape[0], candidates.documents.shape[0]
    _, world = distributed_world(options.group)
    gathering = world > 1 and options.gather is not False and candidates.owners is None
    scores_queries = options.query_query or options.symmetric
    q_all, d_all, keys = q, candidates.documents, candidates.keys
    if gathering:
        # One exchange of (B, N) per rank for every gather below, or none with same_sizes.
        counts = [[B, N]] * world if options.same_sizes else gather_sizes([B, N], q.device, options.group)
        q_sizes, d_sizes = [c[0] for c in counts], [c[1] for c in counts]
        d_all = all_gather_with_grad(d_all, rotate=True, sizes=d_sizes, group=options.group)
        if scores_queries:
            q_all = all_gather_with_grad(q, rotate=True, sizes=q_sizes, group=options.group)
        if keys is not None:
            keys = all_gather_no_grad(keys, rotate=True, sizes=d_sizes, group=options.group)
    if options.mask_duplicates and keys is None:
        keys = duplicate_keys(d_all)
    if keys is None:
        return Gathered(q_all, d_all, None, None, None)
    pos_keys = keys[:N][candidates.positives]
    query_keys = pos_keys
    if gathering and scores_queries:
        query_keys = all_gather_no_grad(pos_keys, rotate=True, sizes=q_sizes, group=options.group)
    return Gathered(q_all, d_all, keys, pos_keys, query_keys)
