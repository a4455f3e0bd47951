"""Exact nearest-neighbour search by dot product, chunked so the full score matrix never exists.

``exact_search`` walks the queries in chunks of ``query_chunk_size`` and, for each, the documents
in chunks of ``chunk_size``, keeping a running top-k per query: peak memory is
O(query_chunk_size * (chunk_size + k)) for the scores plus O(Q * k) for the outputs. Scores are
float32 products of the embeddings cast to float32 (chunk by chunk), whatever their dtype, so a
bf16 model's embeddings are compared at float32 precision. Equal scores are ranked by increasing
document index, for every chunking (``_chunk_candidates`` takes each chunk's top-k with
``torch.topk``, or a stable sort where a row has ties at the cut-off; ``_merge_topk`` merges with
a stable sort).
``exact_search_reference`` is the spec: the full product and one stable sort.

``hamming_search`` is the same exact search over packed binary codes (``binary`` / ``ubinary``
from :func:`~latentembed.modules.quantization.quantize_embeddings`) by smallest Hamming distance,
and ``rescore`` re-ranks its candidates (say the best ``4 k``) with float embeddings: the usual
pair of an in-memory binary index and float vectors read for the few candidates.
"""

from __future__ import annotations

import torch

from ..modules.quantization import hamming_distance

__all__ = ["exact_search", "exact_search_reference", "hamming_search", "rescore"]


def _check_inputs(query_embeddings: torch.Tensor, doc_embeddings: torch.Tensor, k: int) -> None:
    for name, t in (("query_embeddings", query_embeddings), ("doc_embeddings", doc_embeddings)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected shape [n, D], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
    if query_embeddings.shape[1] != doc_embeddings.shape[1]:
        raise ValueError(
            f"doc_embeddings: expected dimension D={query_embeddings.shape[1]} (as query_embeddings "
            f"{tuple(query_embeddings.shape)}), got {tuple(doc_embeddings.shape)}"
        )
    if query_embeddings.device != doc_embeddings.device:
        raise ValueError(
            f"doc_embeddings: expected device {query_embeddings.device} (as query_embeddings), "
            f"got {doc_embeddings.device}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")


def _chunk_candidates(scores: torch.Tensor, start: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k entries of each row of a chunk's scores [q, c] with their document indices,
    listed so that equal scores appear by increasing index (what the stable merge needs).

    ``torch.topk`` is much cheaper than sorting the chunk, but it makes no promise about which of
    several documents tied at the cut-off it keeps. It is asked for k + 1 entries: where every
    row's k-th score is above its (k+1)-th, the k kept are the unique top-k; else the chunk is
    sorted (stable) instead."""
    c = scores.shape[1]
    if k >= c:
        return scores, torch.arange(start, start + c, device=scores.device).expand(scores.shape[0], -1)
    values, idx = torch.topk(scores, k + 1, dim=1, sorted=True)
    if bool((values[:, k - 1] > values[:, k]).all()):
        idx = idx[:, :k].sort(dim=1).values
        return torch.gather(scores, 1, idx), idx + start
    sorted_scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return sorted_scores[:, :k], order[:, :k] + start


def _merge_topk(
    best_scores: torch.Tensor, best_idx: torch.Tensor, scores: torch.Tensor, idx: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the union of the running best ([q, <=k], ties ordered by index) and a chunk's
    candidates ([q, c], ties ordered by index, every index above the running ones). A stable
    descending sort keeps equal scores in concatenation order, i.e. by increasing index."""
    cat_scores = torch.cat([best_scores, scores], dim=1)
    cat_idx = torch.cat([best_idx, idx], dim=1)
    sorted_scores, order = torch.sort(cat_scores, dim=1, descending=True, stable=True)
    keep = min(k, sorted_scores.shape[1])
    return sorted_scores[:, :keep], torch.gather(cat_idx, 1, order[:, :keep])


def exact_search(
    query_embeddings: torch.Tensor,
    doc_embeddings: torch.Tensor,
    k: int,
    *,
    chunk_size: int = 16384,
    query_chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` documents of highest dot product with each query.

    Args:
        query_embeddings: [Q, D] floating point.
        doc_embeddings: [N, D] floating point, same device (the dtypes may differ).
        k: positive int; ``k' = min(k, N)`` results are returned.
        chunk_size: documents scored at a time (positive int).
        query_chunk_size: queries scored at a time (positive int).
    Returns:
        ``(scores [Q, k'] float32, indices [Q, k'] int64)`` on the inputs' device, best first;
        equal scores ordered by increasing document index.
    Raises:
        TypeError / ValueError naming the argument: not a tensor, not 2-D, not floating point,
        mismatched D or device, non-finite values, k or a chunk size not a positive int.

    Example::

        >>> q, d = torch.randn(3, 8), torch.randn(100, 8)
        >>> scores, idx = exact_search(q, d, k=10, chunk_size=32)
        >>> scores.shape, idx.shape
        (torch.Size([3, 10]), torch.Size([3, 10]))
    """
    _check_inputs(query_embeddings, doc_embeddings, k)
    for name, value in (("chunk_size", chunk_size), ("query_chunk_size", query_chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    num_q, num_docs = query_embeddings.shape[0], doc_embeddings.shape[0]
    device = query_embeddings.device
    keep = min(k, num_docs)
    out_scores = torch.zeros(num_q, keep, dtype=torch.float32, device=device)
    out_idx = torch.zeros(num_q, keep, dtype=torch.int64, device=device)
    if num_q == 0 or keep == 0:
        return out_scores, out_idx

    # NaN would sort above every real score and silently win; infinities make inf - inf products.
    if not torch.isfinite(doc_embeddings).all():
        raise ValueError("doc_embeddings: contains NaN or infinite values")
    if not torch.isfinite(query_embeddings).all():
        raise ValueError("query_embeddings: contains NaN or infinite values")

    for q0 in range(0, num_q, query_chunk_size):
        q = query_embeddings[q0 : q0 + query_chunk_size].float()
        best_scores = torch.zeros(q.shape[0], 0, dtype=torch.float32, device=device)
        best_idx = torch.zeros(q.shape[0], 0, dtype=torch.int64, device=device)
        for d0 in range(0, num_docs, chunk_size):
            d = doc_embeddings[d0 : d0 + chunk_size].float()
            scores, idx = _chunk_candidates(q @ d.T, d0, keep)
            best_scores, best_idx = _merge_topk(best_scores, best_idx, scores, idx, keep)
        out_scores[q0 : q0 + q.shape[0]] = best_scores
        out_idx[q0 : q0 + q.shape[0]] = best_idx
    return out_scores, out_idx


def exact_search_reference(
    query_embeddings: torch.Tensor, doc_embeddings: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec of :func:`exact_search`: the full [Q, N] float32 product and one stable sort."""
    _check_inputs(query_embeddings, doc_embeddings, k)
    scores = query_embeddings.float() @ doc_embeddings.float().T
    sorted_scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
    keep = min(k, doc_embeddings.shape[0])
    return sorted_scores[:, :keep], order[:, :keep]


def hamming_search(
    query_codes: torch.Tensor, doc_codes: torch.Tensor, k: int, *, chunk_size: int = 16384
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` documents of smallest Hamming distance to each query, exactly.

    Args:
        query_codes: [Q, B] packed sign bits (int8 ``binary`` or uint8 ``ubinary``).
        doc_codes: [N, B] of the same dtype and width, same device.
        k: positive int (``min(k, N)`` results).
        chunk_size: documents compared at a time (the XOR holds Q x chunk_size x B bytes).
    Returns:
        ``(distances [Q, k'] int32, indices [Q, k'] int64)``, nearest first; equal distances
        ordered by increasing document index.

    Example::

        >>> from latentembed.modules.quantization import quantize_embeddings
        >>> q = quantize_embeddings(torch.randn(2, 64), "ubinary")
        >>> d = quantize_embeddings(torch.randn(50, 64), "ubinary")
        >>> hamming_search(q, d, k=5)[1].shape
        torch.Size([2, 5])
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    if query_codes.device != doc_codes.device:
        raise ValueError(f"doc_codes: expected device {query_codes.device} (as query_codes), got {doc_codes.device}")
    keep = min(k, doc_codes.shape[0])
    best = torch.zeros(query_codes.shape[0], 0, dtype=torch.float32, device=query_codes.device)
    best_idx = torch.zeros(query_codes.shape[0], 0, dtype=torch.int64, device=query_codes.device)
    for d0 in range(0, doc_codes.shape[0], chunk_size):
        # negated distances as float32 scores: exact for any code width below 2**24 bits
        scores = -hamming_distance(query_codes, doc_codes[d0 : d0 + chunk_size]).float()
        scores, idx = _chunk_candidates(scores, d0, keep)
        best, best_idx = _merge_topk(best, best_idx, scores, idx, keep)
    return (-best).to(torch.int32), best_idx


def rescore(
    query_embeddings: torch.Tensor, doc_embeddings: torch.Tensor, candidates: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank each query's ``candidates`` [Q, m] (document indices) by the float dot product of
    ``query_embeddings`` [Q, D] and ``doc_embeddings`` [N, D] (only the candidates' rows are
    read) and keep the best ``min(k, m)``: ``(scores [Q, k'] float32, indices [Q, k'])``, ties
    by candidate order."""
    _check_inputs(query_embeddings, doc_embeddings, k)
    docs = doc_embeddings[candidates].float()  # [Q, m, D]
    scores = torch.einsum("qd,qmd->qm", query_embeddings.float(), docs)
    keep = min(k, candidates.shape[1])
    sorted_scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return sorted_scores[:, :keep], torch.gather(candidates, 1, order[:, :keep])
