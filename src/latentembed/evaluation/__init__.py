"""Retrieval evaluation: BEIR-style data loaders, chunked exact search, nDCG / MRR / recall.

``python -m latentembed eval`` (:mod:`latentembed.evaluation.cli`) runs it on local files;
:func:`evaluate_retrieval` does the same for any model with ``encode(texts, **kwargs)``.
"""

from .data import (
    DatasetFormatError,
    check_qrels,
    load_corpus,
    load_qrels,
    load_queries,
    load_retrieval_dataset,
)
from .evaluate import Encoder, check_retrieval_inputs, evaluate_retrieval, search_results
from .metrics import count_evaluable_queries, per_query_metrics, retrieval_metrics
from .search import exact_search, exact_search_reference

__all__ = [
    "DatasetFormatError",
    "Encoder",
    "check_qrels",
    "check_retrieval_inputs",
    "count_evaluable_queries",
    "evaluate_retrieval",
    "exact_search",
    "exact_search_reference",
    "load_corpus",
    "load_qrels",
    "load_queries",
    "load_retrieval_dataset",
    "per_query_metrics",
    "retrieval_metrics",
    "search_results",
]
