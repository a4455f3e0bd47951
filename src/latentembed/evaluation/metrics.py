"""Ranking metrics for retrieval: nDCG@k, MRR@k and recall@k, as BEIR / pytrec_eval compute them.

Conventions (the spec; :func:`retrieval_metrics` and :func:`per_query_metrics` follow them):

* A document is relevant to a query iff its qrels grade is > 0. Grades <= 0 and documents absent
  from the qrels have gain 0.
* ``nDCG@k``: DCG@k = sum over ranks r = 1..k of grade(doc at r) / log2(r + 1) (linear gain, as
  trec_eval's ``ndcg_cut`` and BEIR); the ideal DCG@k sorts the query's positive grades from the
  qrels in decreasing order. Relevant documents the run never retrieved still count in the ideal.
* ``MRR@k``: 1 / rank of the first relevant document within the top k, else 0.
* ``recall@k``: relevant documents in the top k / relevant documents in the qrels.
* Averages are over the queries of the qrels that have at least one relevant document; the
  others are skipped (:func:`count_evaluable_queries` says how many). Such a query missing from
  the run, or with an empty ranking, scores 0 on every metric. Queries of the run that the qrels
  do not mention are ignored.
* A ranking is either a list of document ids, best first, used as given; or a list of
  ``(doc_id, score)`` pairs, ordered by decreasing score with a *stable* sort, so equal scores
  keep the order they were given in (:func:`~latentembed.evaluation.search.exact_search` lists
  ties by increasing document index). trec_eval instead breaks ties by decreasing document id,
  so on tied scores the two can differ; without ties they agree.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence, Union

__all__ = [
    "Ranking",
    "retrieval_metrics",
    "per_query_metrics",
    "count_evaluable_queries",
    "check_k_values",
    "METRIC_NAMES",
]

METRIC_NAMES = ("ndcg", "mrr", "recall")

Ranking = Union[Sequence[str], Sequence[tuple], Mapping[str, float]]


def check_k_values(k_values: Sequence[int]) -> tuple[int, ...]:
    """Validate ``k_values`` (positive ints) and return them sorted, without duplicates."""
    if isinstance(k_values, (int, str)) or not isinstance(k_values, (Sequence, set, frozenset)):
        raise TypeError(f"k_values: expected a sequence of positive ints, got {k_values!r}")
    ks = []
    for k in k_values:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k_values: expected positive ints, got {k!r} in {list(k_values)!r}")
        ks.append(k)
    if not ks:
        raise ValueError("k_values: expected at least one k, got an empty sequence")
    return tuple(sorted(set(ks)))


def _ranked_ids(query_id: str, ranking: Ranking) -> list[str]:
    """Document ids best first; (doc_id, score) pairs, or a {doc_id: score} dict (pytrec_eval's
    run format), are stably sorted by decreasing score."""
    items = list(ranking.items()) if isinstance(ranking, Mapping) else list(ranking)
    if items and isinstance(items[0], (tuple, list)):
        for item in items:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"results[{query_id!r}]: expected (doc_id, score) pairs throughout, got {item!r}")
        if any(math.isnan(float(s)) for _, s in items):
            raise ValueError(f"results[{query_id!r}]: a score is NaN")
        # Python's sort is stable; sorting on -score keeps given order among equal scores.
        items = [d for d, _ in sorted(items, key=lambda pair: -float(pair[1]))]
    ids = []
    for d in items:
        if not isinstance(d, str):
            raise TypeError(f"results[{query_id!r}]: expected document ids as str, got {d!r}")
        ids.append(d)
    if len(set(ids)) != len(ids):
        dup = next(d for i, d in enumerate(ids) if d in ids[:i])
        raise ValueError(f"results[{query_id!r}]: document {dup!r} is ranked more than once")
    return ids


def _relevant(grades: Mapping[str, int]) -> dict[str, int]:
    return {d: g for d, g in grades.items() if g > 0}


def count_evaluable_queries(qrels: Mapping[str, Mapping[str, int]]) -> tuple[int, int]:
    """``(evaluated, skipped)``: queries of ``qrels`` with / without a relevant (grade > 0) doc."""
    evaluated = sum(1 for grades in qrels.values() if _relevant(grades))
    return evaluated, len(qrels) - evaluated


def _query_metrics(ranked: list[str], relevant: dict[str, int], ks: tuple[int, ...]) -> dict[str, float]:
    gains = [relevant.get(d, 0) for d in ranked[: ks[-1]]]
    ideal = sorted(relevant.values(), reverse=True)
    first_hit = next((r for r, g in enumerate(gains, start=1) if g > 0), None)
    out = {}
    for k in ks:
        dcg = sum(g / math.log2(r + 1) for r, g in enumerate(gains[:k], start=1) if g > 0)
        idcg = sum(g / math.log2(r + 1) for r, g in enumerate(ideal[:k], start=1))
        out[f"ndcg@{k}"] = dcg / idcg
        out[f"mrr@{k}"] = 1.0 / first_hit if first_hit is not None and first_hit <= k else 0.0
        out[f"recall@{k}"] = sum(1 for g in gains[:k] if g > 0) / len(relevant)
    return out


def per_query_metrics(
    results: Mapping[str, Ranking],
    qrels: Mapping[str, Mapping[str, int]],
    k_values: Sequence[int] = (1, 5, 10, 100),
) -> dict[str, dict[str, float]]:
    """Metrics of each query of ``qrels`` that has a relevant document (see the module docstring).

    Args:
        results: query id -> ranking (doc ids best first, or ``(doc_id, score)`` pairs).
        qrels: query id -> {doc id: integer grade}; grade > 0 means relevant.
        k_values: cut-offs.
    Returns:
        query id -> {"ndcg@k", "mrr@k", "recall@k" for each k: float}.

    Example::

        >>> per_query_metrics({"q": ["a", "b"]}, {"q": {"b": 1}}, k_values=(1, 2))["q"]["mrr@2"]
        0.5
    """
    ks = check_k_values(k_values)
    out = {}
    for qid, grades in qrels.items():
        relevant = _relevant(grades)
        if not relevant:
            continue
        ranked = _ranked_ids(qid, results.get(qid, ()))
        out[qid] = _query_metrics(ranked, relevant, ks)
    return out


def retrieval_metrics(
    results: Mapping[str, Ranking],
    qrels: Mapping[str, Mapping[str, int]],
    k_values: Sequence[int] = (1, 5, 10, 100),
) -> dict[str, float]:
    """nDCG@k, MRR@k and recall@k averaged over the queries of ``qrels`` with a relevant document.

    Queries whose qrels hold no grade > 0 are skipped (``count_evaluable_queries(qrels)[1]`` of
    them); a query with relevant documents but no ranking in ``results`` scores 0.

    Returns:
        {"ndcg@k": ..., "mrr@k": ..., "recall@k": ...} for each k in ``k_values``, in the order
        ndcg, mrr, recall and increasing k.
    Raises:
        ValueError: no query of ``qrels`` has a relevant document; bad ``k_values``; a ranking
        that lists a document twice.

    Example::

        >>> retrieval_metrics({"q1": [("d1", 0.9), ("d2", 0.8)]}, {"q1": {"d2": 1}}, k_values=(1, 10))
        {'ndcg@1': 0.0, 'ndcg@10': 0.6309297535714575, 'mrr@1': 0.0, 'mrr@10': 0.5, 'recall@1': 0.0, 'recall@10': 1.0}
    """
    ks = check_k_values(k_values)
    per_query = per_query_metrics(results, qrels, ks)
    if not per_query:
        raise ValueError(f"qrels: no query has a relevant document (grade > 0) among its {len(qrels)} queries")
    n = len(per_query)
    return {f"{name}@{k}": sum(m[f"{name}@{k}"] for m in per_query.values()) / n for name in METRIC_NAMES for k in ks}
