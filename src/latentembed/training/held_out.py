"""Retrieval evaluation before, during (``--eval-every``) and after training: on the held-out
stage-1 rows (each held-out query with its row's prompt, its positive the one relevant document
of a corpus of every held-out positive and negative), or on an ``--eval-data`` BEIR-style set.

Example (``model`` an :class:`~latentembed.models.embedding.EmbeddingModel`)::

    >>> from latentembed.training.held_out import evaluate_held_out, format_eval
    >>> format_eval(evaluate_held_out(model, rows, max_length=128, default_task="retrieval",
    ...                               doc_task=None))  # doctest: +SKIP
    'nDCG@10 0.6933  MRR@10 0.6580  recall@10 0.8065  (62 queries, 186 docs)'
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Optional, Sequence

import torch

from ..evaluation import evaluate_retrieval
from ..models.embedding import EmbeddingModel
from .data import EvalSet, TrainingExample, retrieval_eval_set
from .plan import row_prompt

__all__ = ["QueryPromptEncoder", "evaluate_held_out", "evaluate_eval_set", "format_eval"]

#: The metrics the trainer reports (of those :func:`~latentembed.evaluation.evaluate_retrieval` gives).
REPORTED = ("ndcg@10", "mrr@10", "recall@10", "recall@1", "num_queries", "num_docs")


class QueryPromptEncoder:
    """An encoder for :func:`~latentembed.evaluation.evaluate_retrieval` that gives each query
    its own row's prompt (``prompts``: query text -> (task, instruction)) and each document
    ``doc_task``'s."""

    def __init__(self, model: EmbeddingModel, prompts: dict, max_length: int, doc_task: Optional[str]) -> None:
        self.model, self.prompts, self.max_length, self.doc_task = model, prompts, max_length, doc_task

    def encode(self, texts, batch_size=32, side="doc", **kwargs) -> torch.Tensor:
        """Embeddings [N, D] of ``texts``, encoded in groups that share a prompt."""
        out = [None] * len(texts)
        groups: dict = {}
        for i, t in enumerate(texts):
            groups.setdefault(self.prompts[t] if side == "query" else (self.doc_task, None), []).append(i)
        for (task, instruction), idx in groups.items():
            emb = self.model.encode(
                [texts[i] for i in idx],
                task=task,
                instruction=instruction,
                batch_size=batch_size,
                max_length=self.max_length,
                **kwargs,
            )
            for i, e in zip(idx, emb):
                out[i] = e
        return torch.stack(out)


def evaluate_held_out(
    model: EmbeddingModel,
    held_out: Sequence[TrainingExample],
    *,
    max_length: int,
    default_task: Optional[str],
    doc_task: Optional[str],
    instruction: Optional[str] = None,
    autocast: Optional[ContextManager] = None,
) -> dict:
    """nDCG@10, MRR@10, recall@10, recall@1 and the query and document counts of retrieval on
    the ``held_out`` rows (queries with their row's prompt, or ``instruction`` /
    ``default_task``'s)."""
    corpus, queries, qrels = retrieval_eval_set(held_out)
    prompts = {ex.query: row_prompt(ex, default_task, instruction) for ex in held_out}
    return _evaluate(QueryPromptEncoder(model, prompts, max_length, doc_task), corpus, queries, qrels, autocast)


def evaluate_eval_set(
    model: EmbeddingModel,
    eval_set: EvalSet,
    *,
    max_length: int,
    default_task: Optional[str],
    doc_task: Optional[str],
    instruction: Optional[str] = None,
    autocast: Optional[ContextManager] = None,
) -> dict:
    """:func:`evaluate_held_out`'s metrics on an ``--eval-data`` set: every query with the
    prompt of ``instruction`` (when given) or ``default_task``, documents with ``doc_task``'s."""
    task = None if instruction is not None else default_task
    prompts = dict.fromkeys(eval_set.queries.values(), (task, instruction))
    encoder = QueryPromptEncoder(model, prompts, max_length, doc_task)
    return _evaluate(encoder, eval_set.corpus, eval_set.queries, eval_set.qrels, autocast)


def _evaluate(encoder: QueryPromptEncoder, corpus, queries, qrels, autocast: Optional[ContextManager]) -> dict:
    with autocast if autocast is not None else nullcontext():
        scores = evaluate_retrieval(
            encoder, corpus, queries, qrels, k_values=(1, 10), batch_size=64, query_kwargs={"side": "query"}
        )
    return {k: v for k, v in scores.items() if k in REPORTED}


def format_eval(m: dict) -> str:
    """One line of :func:`evaluate_held_out`'s metrics."""
    return (
        f"nDCG@10 {m['ndcg@10']:.4f}  MRR@10 {m['mrr@10']:.4f}  recall@10 {m['recall@10']:.4f}  "
        f"({m['num_queries']} queries, {m['num_docs']} docs)"
    )
