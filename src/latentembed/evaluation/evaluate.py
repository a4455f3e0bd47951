"""Evaluate an embedding model on a retrieval set: encode, exact search, nDCG / MRR / recall."""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Protocol, Sequence

import numpy as np
import torch

from .data import check_qrels
from .metrics import check_k_values, count_evaluable_queries, retrieval_metrics
from .search import exact_search

__all__ = ["Encoder", "check_retrieval_inputs", "evaluate_retrieval", "search_results"]


class Encoder(Protocol):
    """Anything with ``encode(texts, **kwargs) -> [n, D]`` (a torch.Tensor or a numpy array)."""

    def encode(self, texts: list[str], **kwargs: Any) -> Any: ...


def _encode(model: Encoder, texts: list[str], kwargs: Mapping[str, Any], what: str) -> torch.Tensor:
    emb = model.encode(texts, **kwargs)
    if isinstance(emb, np.ndarray):
        emb = torch.from_numpy(emb)
    if not isinstance(emb, torch.Tensor):
        raise TypeError(f"model.encode({what}): expected a torch.Tensor or numpy array, got {type(emb).__name__}")
    if emb.dim() != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"model.encode({what}): expected shape [{len(texts)}, D], got {tuple(emb.shape)}")
    return emb.detach()


def check_retrieval_inputs(
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    k_values: Sequence[int],
) -> tuple[tuple[int, ...], list[str], int]:
    """The checks of :func:`evaluate_retrieval` that need no model: ``(sorted k values, ids of
    the queries to evaluate, number skipped)``. Raises ValueError for bad k values, an empty
    corpus, qrels naming unknown ids, or no query with a relevant document (grade > 0).

    Example::

        >>> ks, query_ids, skipped = check_retrieval_inputs(corpus, queries, qrels, (1, 10))  # doctest: +SKIP
    """
    ks = check_k_values(k_values)
    if not corpus:
        raise ValueError("corpus: expected at least one document, got none")
    check_qrels(qrels, queries, corpus)
    evaluated, skipped = count_evaluable_queries(qrels)
    if evaluated == 0:
        raise ValueError(f"qrels: no query has a relevant document (grade > 0) among its {len(qrels)} queries")
    return ks, [qid for qid, grades in qrels.items() if any(g > 0 for g in grades.values())], skipped


def _check_dims(query_dim: int, doc_dim: int) -> None:
    if query_dim != doc_dim:
        raise ValueError(f"model.encode: queries embed to dimension {query_dim}, documents to {doc_dim}")


def search_results(
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    scores: torch.Tensor,
    indices: torch.Tensor,
) -> dict[str, list[tuple[str, float]]]:
    """Turn ``exact_search`` output ([Q, k] scores and document indices) into a run:
    ``{query_id: [(doc_id, score), ...]}`` best first."""
    scores_l, idx_l = scores.cpu().tolist(), indices.cpu().tolist()
    return {
        qid: [(doc_ids[j], s) for j, s in zip(row_idx, row_scores)]
        for qid, row_idx, row_scores in zip(query_ids, idx_l, scores_l)
    }


def evaluate_retrieval(
    model: Encoder,
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    k_values: Sequence[int] = (1, 5, 10, 100),
    query_kwargs: Optional[Mapping[str, Any]] = None,
    doc_kwargs: Optional[Mapping[str, Any]] = None,
    batch_size: int = 32,
    chunk_size: int = 16384,
    ignore_identical_ids: bool = False,
    return_run: bool = False,
) -> dict[str, Any]:
    """Encode ``corpus`` and ``queries`` with ``model``, rank by dot product, score against qrels.

    Only the queries that have a relevant document (grade > 0) in ``qrels`` are encoded and
    scored; the rest are counted as skipped (see :mod:`latentembed.evaluation.metrics`). The
    inputs are checked first (:func:`check_retrieval_inputs`), then the shortest document and
    the shortest query are encoded alone, so encode arguments the model refuses (an unknown
    task) and a dimension mismatch fail before the corpus is encoded. Scores are
    dot products of the embeddings as ``model.encode`` returns them: cosine similarity when the
    model normalises (``EmbeddingModel.encode`` does by default).

    Args:
        model: has ``encode(texts, batch_size=..., **kwargs) -> [n, D]`` (e.g. ``EmbeddingModel``).
        corpus: doc id -> text. queries: query id -> text. qrels: query id -> {doc id: grade}.
        k_values: cut-offs; the search retrieves ``max(k_values)`` documents per query.
        query_kwargs / doc_kwargs: extra ``encode`` arguments for each side, e.g.
            ``{"task": "retrieval.query"}`` or ``{"instruction": "Given a question, ..."}``.
        batch_size: passed to ``encode``; chunk_size: documents per search chunk.
        ignore_identical_ids: drop a document whose id equals the query's id from its ranking
            (BEIR's ``EvaluateRetrieval.evaluate`` does so by default, for sets like ArguAna or
            Quora where queries are also in the corpus).
        return_run: also return the ranking under ``"run"`` ({query id: [(doc id, score)]}).
    Returns:
        ``{"ndcg@k", "mrr@k", "recall@k" (floats) for each k, "num_queries" (evaluated),
        "num_queries_skipped" (no relevant document), "num_docs", "embedding_dim",
        "encode_docs_s", "encode_queries_s", "search_s"}`` (+ ``"run"``).
    Raises:
        ValueError: empty corpus, qrels naming unknown ids, no query with a relevant document,
        embeddings of the wrong shape or of different dimension for queries and documents.

    Example::

        >>> scores = evaluate_retrieval(model, corpus, queries, qrels, k_values=(1, 10),  # doctest: +SKIP
        ...                             query_kwargs={"task": "retrieval.query"})
        >>> scores["ndcg@10"], scores["num_queries"]  # doctest: +SKIP
    """
    ks, query_ids, skipped = check_retrieval_inputs(corpus, queries, qrels, k_values)
    doc_ids = list(corpus)
    doc_texts, query_texts = [corpus[d] for d in doc_ids], [queries[q] for q in query_ids]
    doc_kw = {"batch_size": batch_size, **(doc_kwargs or {})}
    query_kw = {"batch_size": batch_size, **(query_kwargs or {})}
    # One (short) text per side first: encode arguments the model refuses (an unknown task, a
    # max_length shorter than the prompt) and a dimension mismatch then fail in a moment, not
    # after the whole corpus has been encoded.
    probe_doc = _encode(model, [min(doc_texts, key=len)], doc_kw, "corpus")
    probe_query = _encode(model, [min(query_texts, key=len)], query_kw, "queries")
    _check_dims(probe_query.shape[1], probe_doc.shape[1])

    t0 = time.perf_counter()
    doc_emb = _encode(model, doc_texts, doc_kw, "corpus")
    t1 = time.perf_counter()
    query_emb = _encode(model, query_texts, query_kw, "queries")
    t2 = time.perf_counter()
    _check_dims(query_emb.shape[1], doc_emb.shape[1])
    depth = ks[-1] + (1 if ignore_identical_ids else 0)
    scores, indices = exact_search(query_emb, doc_emb.to(query_emb.device), depth, chunk_size=chunk_size)
    run = search_results(query_ids, doc_ids, scores, indices)
    if ignore_identical_ids:
        run = {qid: [(d, s) for d, s in ranking if d != qid][: ks[-1]] for qid, ranking in run.items()}
    t3 = time.perf_counter()

    out: dict[str, Any] = dict(retrieval_metrics(run, qrels, ks))
    out.update(
        num_queries=len(query_ids),
        num_queries_skipped=skipped,
        num_docs=len(doc_ids),
        embedding_dim=int(doc_emb.shape[1]),
        encode_docs_s=t1 - t0,
        encode_queries_s=t2 - t1,
        search_s=t3 - t2,
    )
    if return_run:
        out["run"] = run
    return out
