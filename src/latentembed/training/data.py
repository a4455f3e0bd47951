"""Contrastive training data: JSONL reading, the bundled tiny datasets, splits, eval sets, batches.

The JSONL format, one example per line (blank lines are skipped)::

    {"query": "how do I stop pasta sticking?", "positive": "Stir the pasta ...",
     "negatives": ["Pasta is made from ...", "..."], "task": "retrieval"}

* ``query`` and ``positive``: required, non-empty strings.
* ``negatives``: optional list of strings (hard negatives; missing means ``[]``).
* ``task`` and ``instruction``: optional strings (or null); the trainer resolves them to a
  prompt prefix through :func:`latentembed.prompts.resolve_prompt`.
* ``label``: optional, any JSON value; allowed (the bundled classification rows carry it) and
  ignored.
* the field named by ``--eval-group-key`` (``read_examples(path, group_key=...)``): required
  then, a string or number; rows sharing it are held out together.
* Any other field is an error, so a typo such as ``"negative"`` is not silently dropped.

Every error is a ``ValueError`` that starts with ``file:line`` and names the field, what was
expected and what came (bytes that are not UTF-8: the byte and its column).

Example::

    >>> from latentembed.training.data import bundled_examples, split_examples
    >>> train, held_out = split_examples(bundled_examples("retrieval"), 0.1, seed=0)
"""

from __future__ import annotations

import json
import os
import pathlib
import random
from dataclasses import dataclass, field
from importlib import resources
from typing import NamedTuple, Optional, Sequence, Union

from .._text_files import parse_json_line, text_lines
from ..evaluation.data import load_retrieval_dataset

__all__ = [
    "ALLOWED_FIELDS",
    "BUNDLED",
    "TrainingExample",
    "read_examples",
    "bundled_path",
    "bundled_examples",
    "split_examples",
    "retrieval_eval_set",
    "EvalSet",
    "BEIR_NAMES",
    "load_eval_set",
    "write_beir_files",
    "batch_examples",
    "repeated_rows_report",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Bundled datasets: name -> file inside ``latentembed/data``.
BUNDLED: dict[str, str] = {
    "retrieval": "retrieval_tiny.jsonl",  # stage 1: query / answering passage / 2 hard negatives
    "blended": "blended_tiny.jsonl",  # stage 2: classification, clustering, sts pairs
}

#: Fields a JSONL row may carry (``label`` is accepted and ignored).
ALLOWED_FIELDS = ("query", "positive", "negatives", "task", "instruction", "label")


@dataclass
class TrainingExample:
    """One contrastive example: a query, its positive and optional hard negatives.

    ``task`` / ``instruction`` select the query-side prompt (None: the trainer's default).
    ``where``: ``file:line`` of the row when read from a file (for messages; not compared);
    ``group``: the row's value of the group key it was read with (held out together).
    """

    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    task: str | None = None
    instruction: str | None = None
    where: Optional[str] = field(default=None, compare=False, repr=False)
    group: Optional[str] = field(default=None, compare=False, repr=False)


def _parse_row(row: object, where: str, group_key: Optional[str] = None) -> TrainingExample:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    allowed = list(ALLOWED_FIELDS) + ([group_key] if group_key and group_key not in ALLOWED_FIELDS else [])
    unknown = sorted(set(row) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed fields are {allowed}")
    group = None
    if group_key is not None:
        value = row.get(group_key)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value == "":
            raise ValueError(
                f"{where}: field {group_key!r} (the --eval-group-key) must be a non-empty string or a number, "
                f"got {value!r:.80}"
            )
        group = str(value)
    for name in ("query", "positive"):
        if name not in row:
            raise ValueError(f"{where}: missing required field {name!r} (a non-empty string)")
        value = row[name]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {value!r:.80}")
    negatives = row.get("negatives", [])
    if negatives is None:
        negatives = []
    if not isinstance(negatives, list):
        raise ValueError(f"{where}: field 'negatives' must be a list of strings, got {type(negatives).__name__}")
    for i, neg in enumerate(negatives):
        if not isinstance(neg, str) or not neg.strip():
            raise ValueError(f"{where}: field 'negatives' must be a list of non-empty strings, item {i} is {neg!r:.80}")
    optional: dict[str, str | None] = {}
    for name in ("task", "instruction"):
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r} must be a string or null, got {type(value).__name__}")
        optional[name] = value
    return TrainingExample(
        query=row["query"],
        positive=row["positive"],
        negatives=list(negatives),
        task=optional["task"],
        instruction=optional["instruction"],
        where=where,
        group=group,
    )


def read_examples(path: PathLike, group_key: Optional[str] = None) -> list[TrainingExample]:
    """Read a JSONL file of training examples (format in the module docstring).

    ``group_key``: a field every row must carry (a string or a number, e.g. the document a row
    comes from), kept as :attr:`TrainingExample.group`; it is allowed besides
    :data:`ALLOWED_FIELDS`.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming ``file:line`` for
    bytes that are not UTF-8, invalid JSON and a malformed row (with the field).
    """
    examples = []
    for lineno, line in text_lines(path):
        where = f"{os.fspath(path)}:{lineno}"
        examples.append(_parse_row(parse_json_line(line, where), where, group_key))
    return examples


def bundled_path(name: str) -> pathlib.Path:
    """Path of a bundled dataset (``"retrieval"`` or ``"blended"``), installed or editable."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled dataset {name!r}; available: {sorted(BUNDLED)}")
    resource = resources.files("latentembed").joinpath("data", BUNDLED[name])
    # The package is a plain directory (not a zip), so the resource is a real file.
    path = pathlib.Path(str(resource))
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled dataset {name!r} not found at {path}; was the package installed without its package data?"
        )
    return path


def bundled_examples(name: str) -> list[TrainingExample]:
    """The examples of a bundled dataset; see :data:`BUNDLED`."""
    return read_examples(bundled_path(name))


def split_examples(
    examples: Sequence[TrainingExample], eval_fraction: float, seed: int, *, by_group: bool = False
) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """Deterministic random split into (train, eval); eval gets ``round(n * eval_fraction)``.

    Both keep the input order. A nonzero fraction of a list of >= 2 examples gives at least one
    eval and one train example. ``by_group``: hold out whole groups (:attr:`TrainingExample.group`,
    e.g. the article a row comes from, so no topic leaks from training into the evaluation):
    groups in a seeded random order go to eval until it holds about ``eval_fraction`` of the
    rows (at least one group, never all).
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if by_group:
        return _split_groups(examples, eval_fraction, seed)
    n = len(examples)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in eval_idx]
    held_out = [ex for i, ex in enumerate(examples) if i in eval_idx]
    return train, held_out


def _split_groups(
    examples: Sequence[TrainingExample], eval_fraction: float, seed: int
) -> tuple[list[TrainingExample], list[TrainingExample]]:
    sizes: dict = {}
    for i, ex in enumerate(examples):
        if ex.group is None:
            raise ValueError(f"{ex.where or f'row {i + 1}'}: no group (read the rows with group_key=...)")
        sizes[ex.group] = sizes.get(ex.group, 0) + 1
    groups = sorted(sizes)
    random.Random(seed).shuffle(groups)
    target = eval_fraction * len(examples)
    held: set = set()
    count = 0
    if eval_fraction > 0 and len(groups) >= 2:
        for g in groups[:-1]:  # never every group
            if held and abs(count + sizes[g] - target) >= abs(count - target):
                break
            held.add(g)
            count += sizes[g]
    train = [ex for ex in examples if ex.group not in held]
    held_out = [ex for ex in examples if ex.group in held]
    return train, held_out


def retrieval_eval_set(
    examples: Sequence[TrainingExample],
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """A retrieval benchmark built from examples: (corpus, queries, qrels).

    corpus: every distinct positive and negative text, ids ``"d0", "d1", ...`` in order of first
    appearance (identical texts share one id); queries: ``"q0", "q1", ...`` in example order;
    qrels: ``{query_id: {positive_doc_id: 1}}``.
    """
    corpus: dict[str, str] = {}
    doc_ids: dict[str, str] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}

    def doc_id(text: str) -> str:
        if text not in doc_ids:
            doc_ids[text] = f"d{len(doc_ids)}"
            corpus[doc_ids[text]] = text
        return doc_ids[text]

    for i, ex in enumerate(examples):
        qid = f"q{i}"
        queries[qid] = ex.query
        qrels[qid] = {doc_id(ex.positive): 1}
        for neg in ex.negatives:
            doc_id(neg)
    return corpus, queries, qrels


class EvalSet(NamedTuple):
    """A retrieval set to evaluate on: ``corpus`` {doc id: text}, ``queries`` {query id: text},
    ``qrels`` {query id: {doc id: grade}} and ``source`` (where it was read, for messages)."""

    corpus: dict
    queries: dict
    qrels: dict
    source: str


#: Where :func:`load_eval_set` looks for each file of a BEIR-style directory, in order.
BEIR_NAMES = {
    "corpus": ("corpus.jsonl", "corpus.jsonl.gz"),
    "queries": ("queries.jsonl", "queries.jsonl.gz"),
    "qrels": ("qrels.jsonl", "qrels.tsv", "qrels/test.tsv", "qrels/dev.tsv", "qrels.jsonl.gz", "qrels.tsv.gz"),
}


def load_eval_set(directory: PathLike) -> EvalSet:
    """The BEIR-style set in ``directory`` (the formats ``python -m latentembed eval`` reads):
    ``corpus.jsonl``, ``queries.jsonl`` and ``qrels.jsonl`` / ``qrels.tsv`` / ``qrels/test.tsv``
    (:data:`BEIR_NAMES`; ``.gz`` too), as :func:`write_beir_files` writes them. Errors name the
    file and line, or the file that is missing."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"--eval-data {directory}: not a directory (expected corpus.jsonl, queries.jsonl, qrels)"
        )
    found = {}
    for kind, names in BEIR_NAMES.items():
        hit = next((directory / n for n in names if (directory / n).is_file()), None)
        if hit is None:
            raise FileNotFoundError(f"--eval-data {directory}: no {kind} file (looked for {', '.join(names)})")
        found[kind] = hit
    corpus, queries, qrels = load_retrieval_dataset(found["corpus"], found["queries"], found["qrels"])
    return EvalSet(corpus=corpus, queries=queries, qrels=qrels, source=str(directory))


def write_beir_files(
    corpus: dict[str, str],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    directory: PathLike,
) -> dict[str, pathlib.Path]:
    """Write BEIR-style ``corpus.jsonl``, ``queries.jsonl``, ``qrels.jsonl`` into ``directory``.

    Rows: ``{"_id", "text"}`` for corpus and queries, ``{"query-id", "corpus-id", "score"}`` for
    qrels. Returns ``{"corpus": path, "queries": path, "qrels": path}``.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / f"{name}.jsonl" for name in ("corpus", "queries", "qrels")}

    def write(path: pathlib.Path, rows) -> None:
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    write(paths["corpus"], ({"_id": k, "text": v} for k, v in corpus.items()))
    write(paths["queries"], ({"_id": k, "text": v} for k, v in queries.items()))
    write(
        paths["qrels"],
        ({"query-id": q, "corpus-id": d, "score": s} for q, docs in qrels.items() for d, s in docs.items()),
    )
    return paths


def batch_examples(
    examples: Sequence[TrainingExample],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
) -> list[list[TrainingExample]]:
    """This rank's batches for one epoch.

    The examples are shuffled with ``(seed, epoch)``, cut into global batches of
    ``batch_size * world_size``, and rank ``r`` takes the ``r``-th slice of ``batch_size`` of each
    global batch, so ranks see disjoint examples and every rank gets the same number of batches
    (a collective per step cannot hang). ``drop_last=True`` drops the incomplete last global batch;
    ``drop_last=False`` splits it as evenly as possible across ranks (sizes differ by at most one;
    with fewer leftover examples than ranks, a rank may get an empty final batch, which keeps the
    batch count equal: the trainer must skip or handle empty batches).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    order = list(range(len(examples)))
    # One RNG stream per (seed, epoch): an integer mix so epochs never collide for small seeds.
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    global_size = batch_size * world_size
    batches = []
    for start in range(0, len(order), global_size):
        chunk = order[start : start + global_size]
        if len(chunk) < global_size:
            if drop_last:
                break
            # Even split of the remainder: rank r gets chunk[r::world_size]'s share, contiguous.
            base, extra = divmod(len(chunk), world_size)
            lo = rank * base + min(rank, extra)
            hi = lo + base + (1 if rank < extra else 0)
            mine = chunk[lo:hi]
        else:
            mine = chunk[rank * batch_size : (rank + 1) * batch_size]
        batches.append([examples[i] for i in mine])
    return batches


def repeated_rows_report(examples: Sequence[TrainingExample]) -> Optional[str]:
    """What repeats among ``examples`` (None: nothing), as one message with counts and an
    example ``file:line`` pair per kind.

    Two kinds, a row counted once (the first that it repeats): a row repeating an earlier
    row's query (same task and instruction) and positive, and one repeating an earlier query
    with another positive. The trainer masks a document equal to a query's positive (same text,
    same id), so the first kind brings no false negative; it weighs the row more and, split
    between training and held-out rows, inflates the held-out metrics. The second kind is a
    false negative whenever both rows share a batch with in-batch negatives (stage 1).
    """
    first_pair: dict = {}
    first_query: dict = {}
    same: list = []
    other: list = []
    for i, ex in enumerate(examples):
        where = ex.where or f"row {i + 1}"
        query = (ex.query, ex.task, ex.instruction)
        pair = (*query, ex.positive)
        if pair in first_pair:
            same.append((where, first_pair[pair]))
        elif query in first_query:
            other.append((where, first_query[query]))
        first_pair.setdefault(pair, where)
        first_query.setdefault(query, where)
    parts = []
    if same:
        parts.append(
            f"{_rows_repeat(len(same))} an earlier row's query and positive (e.g. {same[0][0]} repeats "
            f"{same[0][1]}): the loss masks documents equal to a query's positive, so they are no false negatives, "
            "but each repeat "
            "weighs its row more, and repeats split between training and held-out rows inflate the held-out metrics"
        )
    if other:
        parts.append(
            f"{_rows_repeat(len(other))} an earlier row's query with another positive (e.g. {other[0][0]} and "
            f"{other[0][1]}): in a stage-1 batch holding both, each positive is a false negative for the other row; "
            "keep one positive per query"
        )
    return "; ".join(parts) if parts else None


def _rows_repeat(n: int) -> str:
    return "1 row repeats" if n == 1 else f"{n} rows repeat"
