"""Loaders for BEIR-style retrieval data: a JSONL corpus, JSONL queries and qrels (JSONL or TSV).

Formats (UTF-8; a ``.gz`` suffix is read through gzip; blank lines are skipped):

* corpus, one JSON object a line: ``{"_id": str, "text": str, "title": str (optional)}``. A
  non-empty title is prepended as ``title + " " + text`` (what BEIR's Sentence-BERT wrapper
  encodes); a missing, null or empty title leaves the text as is.
* queries, one a line: ``{"_id": str, "text": str}``.
* qrels, either JSONL rows ``{"query-id": str, "corpus-id": str, "score": int}`` or BEIR's TSV
  with the header line ``query-id<TAB>corpus-id<TAB>score``. A ``.tsv`` suffix means TSV, a
  ``.jsonl`` / ``.json`` suffix JSONL; otherwise a first line starting with ``{`` means JSONL.

Ids may be JSON strings or integers (read as their decimal string). Every error names
``file:line`` and what was wrong there: bytes that are not UTF-8 (or damaged gzip data), invalid
JSON, a missing or mistyped field, a duplicate id or (query, document) pair, a qrels row naming an
unknown query or document.
"""

from __future__ import annotations

import os
from typing import Collection, Iterator, Optional, Union

from .._text_files import parse_json_line, text_lines

__all__ = [
    "DatasetFormatError",
    "load_corpus",
    "load_queries",
    "load_qrels",
    "load_retrieval_dataset",
    "check_qrels",
]

PathLike = Union[str, "os.PathLike[str]"]


class DatasetFormatError(ValueError):
    """A retrieval data file is malformed; the message starts with ``file:line:``."""


def _lines(path: PathLike) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its break) for every non-blank line."""
    return text_lines(path, error=DatasetFormatError)


def _json_rows(path: PathLike) -> Iterator[tuple[str, dict]]:
    for lineno, line in _lines(path):
        where = f"{os.fspath(path)}:{lineno}"
        row = parse_json_line(line, where, error=DatasetFormatError)
        if not isinstance(row, dict):
            raise DatasetFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def _id_field(where: str, row: dict, field: str) -> str:
    if field not in row:
        raise DatasetFormatError(f"{where}: missing field {field!r}")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DatasetFormatError(f"{where}: field {field!r} must be a string id, got {value!r}")
    value = str(value)
    if not value:
        raise DatasetFormatError(f"{where}: field {field!r} is empty")
    return value


def _text_field(where: str, row: dict, field: str, *, required: bool = True) -> Optional[str]:
    if field not in row or row[field] is None:
        if required:
            raise DatasetFormatError(f"{where}: missing field {field!r}")
        return None
    value = row[field]
    if not isinstance(value, str):
        raise DatasetFormatError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _grade(where: str, value) -> int:
    if isinstance(value, str):
        try:
            value = float(value.strip()) if any(c in value for c in ".eE") else int(value.strip())
        except ValueError:
            raise DatasetFormatError(f"{where}: score must be an integer, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetFormatError(f"{where}: score must be an integer, got {value!r}")
    return value


def load_corpus(path: PathLike) -> dict[str, str]:
    """Read a BEIR JSONL corpus into ``{doc_id: text}`` (file order; title prepended if non-empty).

    Example::

        >>> corpus = load_corpus("corpus.jsonl")  # doctest: +SKIP
        >>> corpus["d1"]  # doctest: +SKIP
        'Paris ...'
    """
    corpus: dict[str, str] = {}
    first_seen: dict[str, str] = {}
    for where, row in _json_rows(path):
        doc_id = _id_field(where, row, "_id")
        text = _text_field(where, row, "text")
        title = _text_field(where, row, "title", required=False)
        if doc_id in corpus:
            raise DatasetFormatError(f"{where}: duplicate document id {doc_id!r} (first at {first_seen[doc_id]})")
        first_seen[doc_id] = where
        corpus[doc_id] = f"{title} {text}" if title and title.strip() else text
    return corpus


def load_queries(path: PathLike) -> dict[str, str]:
    """Read BEIR JSONL queries into ``{query_id: text}`` (file order)."""
    queries: dict[str, str] = {}
    first_seen: dict[str, str] = {}
    for where, row in _json_rows(path):
        query_id = _id_field(where, row, "_id")
        text = _text_field(where, row, "text")
        if query_id in queries:
            raise DatasetFormatError(f"{where}: duplicate query id {query_id!r} (first at {first_seen[query_id]})")
        first_seen[query_id] = where
        queries[query_id] = text
    return queries


def _is_tsv(path: PathLike) -> bool:
    name = os.fspath(path)
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith(".tsv"):
        return True
    if base.endswith((".jsonl", ".json")):
        return False
    first = next(_lines(path), None)
    return first is not None and not first[1].lstrip().startswith("{")


def _qrels_rows(path: PathLike) -> Iterator[tuple[str, str, str, object]]:
    name = os.fspath(path)
    if not _is_tsv(path):
        for where, row in _json_rows(path):
            qid = _id_field(where, row, "query-id")
            did = _id_field(where, row, "corpus-id")
            if "score" not in row:
                raise DatasetFormatError(f"{where}: missing field 'score'")
            yield where, qid, did, row["score"]
        return
    header_seen = False
    for lineno, line in _lines(path):
        where = f"{name}:{lineno}"
        fields = [f.strip() for f in line.split("\t")]
        if not header_seen:
            if fields != ["query-id", "corpus-id", "score"]:
                raise DatasetFormatError(
                    f"{where}: expected the TSV header 'query-id<TAB>corpus-id<TAB>score', got {line!r}"
                )
            header_seen = True
            continue
        if len(fields) != 3:
            missing = ["query-id", "corpus-id", "score"][len(fields) :] if len(fields) < 3 else []
            what = f"missing field {missing[0]!r}" if missing else f"{len(fields)} tab-separated fields"
            raise DatasetFormatError(f"{where}: expected 3 tab-separated fields, got {what}")
        for field, value in zip(("query-id", "corpus-id"), fields):
            if not value:
                raise DatasetFormatError(f"{where}: field {field!r} is empty")
        yield where, fields[0], fields[1], fields[2]


def load_qrels(
    path: PathLike,
    *,
    query_ids: Optional[Collection[str]] = None,
    corpus_ids: Optional[Collection[str]] = None,
) -> dict[str, dict[str, int]]:
    """Read qrels into ``{query_id: {doc_id: grade}}``; grade > 0 means relevant.

    Args:
        path: JSONL or TSV qrels (see the module docstring).
        query_ids / corpus_ids: when given, a row naming an id outside them is an error.
    Raises:
        FileNotFoundError; DatasetFormatError naming file:line (bad row, duplicate
        (query, document) pair, unknown id).
    """
    known_q = set(query_ids) if query_ids is not None else None
    known_d = set(corpus_ids) if corpus_ids is not None else None
    qrels: dict[str, dict[str, int]] = {}
    for where, qid, did, score in _qrels_rows(path):
        grade = _grade(where, score)
        if known_q is not None and qid not in known_q:
            raise DatasetFormatError(f"{where}: unknown query id {qid!r} (not in the queries)")
        if known_d is not None and did not in known_d:
            raise DatasetFormatError(f"{where}: unknown document id {did!r} (not in the corpus)")
        grades = qrels.setdefault(qid, {})
        if did in grades:
            raise DatasetFormatError(f"{where}: duplicate qrels row for query {qid!r}, document {did!r}")
        grades[did] = grade
    return qrels


def check_qrels(qrels: dict[str, dict[str, int]], queries: Collection[str], corpus: Collection[str]) -> None:
    """Raise ValueError if ``qrels`` names a query not in ``queries`` or a doc not in ``corpus``."""
    for qid, grades in qrels.items():
        if qid not in queries:
            raise ValueError(f"qrels: unknown query id {qid!r} (not in the queries)")
        for did, grade in grades.items():
            if did not in corpus:
                raise ValueError(f"qrels[{qid!r}]: unknown document id {did!r} (not in the corpus)")
            if isinstance(grade, bool) or not isinstance(grade, int):
                raise ValueError(f"qrels[{qid!r}][{did!r}]: grade must be an int, got {grade!r}")


def load_retrieval_dataset(
    corpus_path: PathLike, queries_path: PathLike, qrels_path: PathLike
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """``(corpus, queries, qrels)`` from the three files, qrels checked against the other two."""
    corpus = load_corpus(corpus_path)
    queries = load_queries(queries_path)
    qrels = load_qrels(qrels_path, query_ids=queries, corpus_ids=corpus)
    return corpus, queries, qrels
