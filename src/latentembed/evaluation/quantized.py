"""How much retrieval quality each embedding precision keeps, from one set of float embeddings.

:func:`evaluate_precisions` quantises the document embeddings to each precision and searches:

* ``float32``: exact dot-product search (the baseline);
* ``int8`` / ``uint8``: float queries against the documents' dequantised codes (buckets from
  ``calibration``, default the documents themselves), exact;
* ``binary`` / ``ubinary``: queries binarised too, exact Hamming search
  (:func:`~latentembed.evaluation.search.hamming_search`), then optionally the best
  ``rescore_multiplier * k`` candidates re-ranked with the float embeddings
  (:func:`~latentembed.evaluation.search.rescore`).

Each row: the precision, the search, nDCG@k / recall@k, the fraction of float32's nDCG kept and
the bytes per document vector.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from ..modules.quantization import (
    bytes_per_vector,
    calibration_ranges,
    dequantize_embeddings,
    quantize_embeddings,
)
from .evaluate import search_results
from .metrics import check_k_values, retrieval_metrics
from .search import exact_search, hamming_search, rescore

__all__ = ["evaluate_precisions"]


def evaluate_precisions(
    query_embeddings: torch.Tensor,
    doc_embeddings: torch.Tensor,
    *,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    qrels: Mapping[str, Mapping[str, int]],
    precisions: Sequence[str] = ("float32", "int8", "uint8", "binary", "ubinary"),
    k: int = 10,
    rescore_multiplier: Optional[int] = 4,
    calibration: Optional[torch.Tensor] = None,
) -> list[dict]:
    """One row per (precision, search) with ``ndcg@k``, ``recall@k``, ``kept`` (nDCG@k / float32's)
    and ``bytes_per_vector``.

    Args:
        query_embeddings: [Q, D] float, in ``query_ids`` order; doc_embeddings: [N, D] float, in
            ``doc_ids`` order; qrels: query id -> {doc id: grade}.
        precisions: those of :data:`~latentembed.modules.quantization.PRECISIONS` to measure.
        k: the cut-off of nDCG and recall.
        rescore_multiplier: binary rows also re-ranked from ``rescore_multiplier * k`` Hamming
            candidates with the float embeddings (``None``: not).
        calibration: [M, D] float embeddings for the int8 / uint8 buckets (default: the documents).

    Example::

        >>> rows = evaluate_precisions(q, d, query_ids=qids, doc_ids=dids, qrels=qrels)  # doctest: +SKIP
        >>> [(r["precision"], r["search"], round(r["kept"], 3)) for r in rows]  # doctest: +SKIP
    """
    (k,) = check_k_values((k,))
    if query_embeddings.shape[0] != len(query_ids) or doc_embeddings.shape[0] != len(doc_ids):
        raise ValueError(
            f"embeddings [{query_embeddings.shape[0]}, D] / [{doc_embeddings.shape[0]}, D] do not match "
            f"{len(query_ids)} query ids / {len(doc_ids)} doc ids"
        )
    ranges = calibration_ranges(doc_embeddings if calibration is None else calibration)
    dim = doc_embeddings.shape[1]
    rows, base = [], None

    def add(precision: str, search: str, scores: torch.Tensor, idx: torch.Tensor) -> None:
        nonlocal base
        metrics = retrieval_metrics(search_results(query_ids, doc_ids, scores.float(), idx), qrels, (k,))
        if precision == "float32":
            base = metrics[f"ndcg@{k}"]
        rows.append(
            {
                "precision": precision,
                "search": search,
                f"ndcg@{k}": metrics[f"ndcg@{k}"],
                f"recall@{k}": metrics[f"recall@{k}"],
                "bytes_per_vector": bytes_per_vector(dim, precision),
            }
        )

    for precision in precisions:
        if precision == "float32":
            add(precision, "dot product", *exact_search(query_embeddings, doc_embeddings, k))
        elif precision in ("int8", "uint8"):
            codes = quantize_embeddings(doc_embeddings, precision, ranges=ranges)
            docs = dequantize_embeddings(codes, precision, ranges=ranges)
            add(precision, "float query . dequantised docs", *exact_search(query_embeddings, docs, k))
        else:
            q_codes = quantize_embeddings(query_embeddings, precision)
            d_codes = quantize_embeddings(doc_embeddings, precision)
            distances, idx = hamming_search(q_codes, d_codes, k)
            add(precision, "hamming", -distances, idx)
            if rescore_multiplier:
                _, candidates = hamming_search(q_codes, d_codes, rescore_multiplier * k)
                add(
                    precision,
                    f"hamming top-{rescore_multiplier * k}, float rescore",
                    *rescore(query_embeddings, doc_embeddings, candidates, k),
                )
    for row in rows:
        row["kept"] = row[f"ndcg@{k}"] / base if base else float("nan")
    return rows
