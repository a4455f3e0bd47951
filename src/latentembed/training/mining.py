"""Hard-negative mining: the documents a model ranks highest for each query, minus the likely
false negatives, as training rows with ``negatives`` (``python -m latentembed mine``).

For every row the query (with its row's prompt, as the trainer builds it) and every text of the
corpus are encoded; the package's exact search (:func:`~latentembed.evaluation.exact_search`,
chunked, on the model's device) returns the ``candidates`` best documents; a candidate is
dropped when it is one of the query's positives, or scores above ``max_score_ratio`` times the
positive's score (NV-Retriever's "TopK-PercPos" rule, 0.95 there; sentence-transformers'
``relative_margin`` is ``1 - max_score_ratio``) or within ``absolute_margin`` of it. The first
``num_negatives`` survivors, best first, become the row's negatives.

Example::

    >>> rows = read_examples("train.jsonl")                                    # doctest: +SKIP
    >>> mined, stats = mine_hard_negatives(model, rows, num_negatives=4)       # doctest: +SKIP
    >>> write_examples("mined.jsonl", mined)                                   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence, Union

import torch

from ..atomic_io import atomic_write_text
from ..evaluation.search import exact_search
from ..models.embedding import EmbeddingModel
from .data import TrainingExample
from .plan import row_prompt

__all__ = ["MiningStats", "mine_hard_negatives", "write_examples"]


@dataclasses.dataclass
class MiningStats:
    """What mining did: ``rows``, ``corpus`` (distinct documents searched), ``negatives``
    (mined in all), ``dropped_positive`` (candidates that were a positive of the query),
    ``dropped_margin`` (candidates above the margin rule: likely false negatives), ``short_rows``
    (rows with fewer than ``num_negatives`` survivors)."""

    rows: int = 0
    corpus: int = 0
    negatives: int = 0
    dropped_positive: int = 0
    dropped_margin: int = 0
    short_rows: int = 0


def _check(num_negatives: int, candidates: int, max_score_ratio: float, absolute_margin: Optional[float]) -> None:
    for name, value in (("num_negatives", num_negatives), ("candidates", candidates)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if candidates < num_negatives:
        raise ValueError(f"candidates: expected at least num_negatives ({num_negatives}), got {candidates}")
    if not 0 < max_score_ratio <= 1:
        raise ValueError(f"max_score_ratio: expected a number in (0, 1], got {max_score_ratio!r}")
    if absolute_margin is not None and not absolute_margin >= 0:
        raise ValueError(f"absolute_margin: expected a number >= 0 or None, got {absolute_margin!r}")


@torch.no_grad()
def mine_hard_negatives(
    model: EmbeddingModel,
    rows: Sequence[TrainingExample],
    *,
    corpus: Optional[Sequence[str]] = None,
    num_negatives: int = 4,
    candidates: int = 30,
    max_score_ratio: float = 0.95,
    absolute_margin: Optional[float] = None,
    default_task: Optional[str] = "retrieval",
    instruction: Optional[str] = None,
    doc_task: Optional[str] = None,
    batch_size: int = 32,
    max_length: Optional[int] = None,
    chunk_size: int = 16384,
) -> tuple[list[TrainingExample], MiningStats]:
    """Rows like ``rows`` with mined ``negatives`` (their own replaced), and what was done.

    Args:
        model: the embedding model (its device does the search).
        rows: training rows (query, positive; task / instruction choose the query's prompt,
            ``default_task`` / ``instruction`` for rows without, as in training).
        corpus: the documents to mine from (default: every row's positive and negatives);
            the positives are searched too, so a query's own positive can be recognised.
        num_negatives: negatives per row; candidates: documents retrieved per query (k).
        max_score_ratio: drop candidates scoring above this fraction of the positive's score.
        absolute_margin: also drop candidates scoring above ``positive - absolute_margin``.
        doc_task: the documents' prompt (None: none, as in training).
        batch_size, max_length: passed to ``encode``; chunk_size: documents scored at a time.
    Returns:
        (rows [len(rows)], :class:`MiningStats`).
    """
    _check(num_negatives, candidates, max_score_ratio, absolute_margin)
    rows = list(rows)
    if not rows:
        raise ValueError("rows: expected at least one training row, got none")
    texts = list(corpus) if corpus is not None else [t for ex in rows for t in (ex.positive, *ex.negatives)]
    texts = list(dict.fromkeys(texts + [ex.positive for ex in rows]))
    index = {t: i for i, t in enumerate(texts)}
    encode = dict(batch_size=batch_size, max_length=max_length)
    docs = model.encode(texts, task=doc_task, **encode)
    queries = torch.empty(len(rows), docs.shape[1], dtype=docs.dtype, device=docs.device)
    groups: dict = {}
    for i, ex in enumerate(rows):  # one encode per distinct prompt
        groups.setdefault(row_prompt(ex, default_task, instruction), []).append(i)
    for (task, instr), members in groups.items():
        queries[members] = model.encode([rows[i].query for i in members], task=task, instruction=instr, **encode)

    positives: dict = {}  # a query repeated with several positives: none of them is a negative
    for ex in rows:
        positives.setdefault(ex.query, set()).add(index[ex.positive])
    scores, found = exact_search(
        queries, docs, min(candidates + len(max(positives.values(), key=len)), len(texts)), chunk_size=chunk_size
    )
    pos_scores = (queries * docs[[index[ex.positive] for ex in rows]]).sum(-1)
    stats = MiningStats(rows=len(rows), corpus=len(texts))
    out = []
    for i, ex in enumerate(rows):
        ceiling = float(pos_scores[i]) * max_score_ratio if pos_scores[i] > 0 else float(pos_scores[i])
        if absolute_margin is not None:
            ceiling = min(ceiling, float(pos_scores[i]) - absolute_margin)
        mined = []
        for score, j in zip(scores[i].tolist(), found[i].tolist()):
            if j in positives[ex.query]:
                stats.dropped_positive += 1
            elif score > ceiling:
                stats.dropped_margin += 1
            elif len(mined) < num_negatives:
                mined.append(texts[j])
        stats.negatives += len(mined)
        stats.short_rows += len(mined) < num_negatives
        out.append(dataclasses.replace(ex, negatives=mined))
    return out, stats


def write_examples(
    path: Union[str, os.PathLike], rows: Sequence[TrainingExample], *, group_key: Optional[str] = None
) -> None:
    """Write training rows as JSONL (``query``, ``positive``, ``negatives``, ``task`` and
    ``instruction`` when set, the group under ``group_key``), atomically."""
    lines = []
    for ex in rows:
        row = {"query": ex.query, "positive": ex.positive, "negatives": list(ex.negatives)}
        if ex.task is not None:
            row["task"] = ex.task
        if ex.instruction is not None:
            row["instruction"] = ex.instruction
        if group_key is not None and ex.group is not None:
            row[group_key] = ex.group
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_text(path, "".join(lines))
