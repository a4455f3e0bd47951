"""latentembed.training.data: JSONL reading and errors, bundled datasets, splits, eval sets,
batching."""

import json

import pytest

from latentembed.training.data import (
    ALLOWED_FIELDS,
    BUNDLED,
    TrainingExample,
    batch_examples,
    bundled_examples,
    bundled_path,
    read_examples,
    retrieval_eval_set,
    split_examples,
    write_beir_files,
)

MIN_ROWS = {"retrieval": 300, "blended": 100}
TASKS = {"retrieval": {"retrieval"}, "blended": {"classification", "clustering", "sts"}}


def _examples(n, negatives=1):
    return [
        TrainingExample(f"query {i}", f"positive {i}", [f"negative {i}.{j}" for j in range(negatives)])
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------- bundled data


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_dataset_is_valid(name):
    path = bundled_path(name)
    assert path.is_file() and path.name == BUNDLED[name]
    text = path.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    examples = bundled_examples(name)
    assert len(examples) == len(rows) >= MIN_ROWS[name]
    for row in rows:
        assert set(row) <= set(ALLOWED_FIELDS)
        assert row["task"] in TASKS[name]
        assert name != "blended" or row["task"] == "sts" or isinstance(row.get("label"), str)
    queries = [ex.query.strip().lower() for ex in examples]
    assert len(set(queries)) == len(queries), "duplicate queries"
    for ex in examples:
        assert ex.task in TASKS[name]
        texts = [ex.query, ex.positive, *ex.negatives]
        assert all(isinstance(t, str) and t.strip() == t and t for t in texts)
        assert 1 <= len(ex.negatives) <= 2 and (name == "blended" or len(ex.negatives) == 2)
        assert ex.positive not in ex.negatives and ex.query != ex.positive
        assert len(set(ex.negatives)) == len(ex.negatives)
        if name == "retrieval":
            assert all(len(t.split()) <= 40 for t in texts[1:])


def test_bundled_retrieval_passages_are_unique():
    examples = bundled_examples("retrieval")
    corpus, queries, qrels = retrieval_eval_set(examples)
    assert len(corpus) == 3 * len(examples)  # no passage reused across rows
    assert len(queries) == len(qrels) == len(examples)


def test_bundled_unknown_name():
    with pytest.raises(ValueError, match="retrieval"):
        bundled_path("nope")


# ---------------------------------------------------------------------------------- reading


def test_read_examples_fields_and_blank_lines(tmp_path):
    path = tmp_path / "ok.jsonl"
    rows = [
        {"query": "q1", "positive": "p1", "negatives": ["n1", "n2"], "task": "retrieval"},
        {"query": "q2", "positive": "p2"},
        {"query": "q3", "positive": "p3", "negatives": [], "instruction": "Find it", "label": 3},
        {"query": "q4", "positive": "p4", "negatives": None, "task": None},
    ]
    lines = [json.dumps(r) for r in rows]
    path.write_text(lines[0] + "\n\n  \n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    got = read_examples(str(path))
    assert got == [
        TrainingExample("q1", "p1", ["n1", "n2"], task="retrieval"),
        TrainingExample("q2", "p2", []),
        TrainingExample("q3", "p3", [], instruction="Find it"),
        TrainingExample("q4", "p4", []),
    ]


@pytest.mark.parametrize(
    "line, field, expected",
    [
        ('{"query": "q", "positive": "p"', None, "invalid JSON"),
        ('["q", "p"]', None, "JSON object"),
        ('{"positive": "p"}', "query", "missing required field"),
        ('{"query": "q"}', "positive", "missing required field"),
        ('{"query": 3, "positive": "p"}', "query", "non-empty string"),
        ('{"query": "  ", "positive": "p"}', "query", "non-empty string"),
        ('{"query": "q", "positive": ["p"]}', "positive", "non-empty string"),
        ('{"query": "q", "positive": "p", "negatives": "n"}', "negatives", "list of strings"),
        ('{"query": "q", "positive": "p", "negatives": ["n", 2]}', "negatives", "item 1"),
        ('{"query": "q", "positive": "p", "task": 1}', "task", "string or null"),
        ('{"query": "q", "positive": "p", "instruction": ["x"]}', "instruction", "string or null"),
        ('{"query": "q", "positive": "p", "negative": ["n"]}', "negative", "allowed fields"),
    ],
)
def test_read_examples_errors_name_file_line_and_field(tmp_path, line, field, expected):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"query": "fine", "positive": "fine too"})
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_examples(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert expected in message
    if field is not None:
        assert repr(field) in message
    if expected == "allowed fields":
        assert all(name in message for name in ALLOWED_FIELDS)


def test_read_examples_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_examples(tmp_path / "absent.jsonl")


# ---------------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_complete():
    examples = _examples(103)
    train, held_out = split_examples(examples, 0.2, seed=7)
    assert len(held_out) == round(103 * 0.2) and len(train) + len(held_out) == 103
    ids = lambda xs: [id(x) for x in xs]  # noqa: E731
    assert not set(ids(train)) & set(ids(held_out))
    assert set(ids(train)) | set(ids(held_out)) == set(ids(examples))
    # order within each part follows the input
    assert ids(train) == sorted(ids(train), key=ids(examples).index)
    assert (train, held_out) == split_examples(examples, 0.2, seed=7)
    assert held_out != split_examples(examples, 0.2, seed=8)[1]


def test_split_edge_cases():
    examples = _examples(5)
    assert split_examples(examples, 0.0, seed=0) == (examples, [])
    train, held_out = split_examples(examples, 0.01, seed=0)
    assert len(held_out) == 1 and len(train) == 4
    with pytest.raises(ValueError, match="eval_fraction"):
        split_examples(examples, 1.0, seed=0)


# ---------------------------------------------------------------------------------- eval sets


def test_retrieval_eval_set_dedups_and_points_at_positives():
    examples = [
        TrainingExample("q a", "shared passage", ["neg x", "neg y"]),
        TrainingExample("q b", "pos b", ["shared passage", "neg x"]),
        TrainingExample("q c", "neg y", []),
    ]
    corpus, queries, qrels = retrieval_eval_set(examples)
    assert corpus == {"d0": "shared passage", "d1": "neg x", "d2": "neg y", "d3": "pos b"}
    assert queries == {"q0": "q a", "q1": "q b", "q2": "q c"}
    assert qrels == {"q0": {"d0": 1}, "q1": {"d3": 1}, "q2": {"d2": 1}}
    assert retrieval_eval_set(examples) == (corpus, queries, qrels)


def test_write_beir_files_round_trip(tmp_path):
    corpus, queries, qrels = retrieval_eval_set(bundled_examples("retrieval")[:20])
    paths = write_beir_files(corpus, queries, qrels, tmp_path / "beir")
    assert set(paths) == {"corpus", "queries", "qrels"}

    def read(name):
        return [json.loads(line) for line in paths[name].read_text(encoding="utf-8").splitlines()]

    assert {r["_id"]: r["text"] for r in read("corpus")} == corpus
    assert {r["_id"]: r["text"] for r in read("queries")} == queries
    back = {}
    for r in read("qrels"):
        assert set(r) == {"query-id", "corpus-id", "score"}
        back.setdefault(r["query-id"], {})[r["corpus-id"]] = r["score"]
    assert back == qrels


# ---------------------------------------------------------------------------------- batching


@pytest.mark.parametrize("n, batch_size, world_size", [(37, 4, 1), (37, 4, 3), (50, 5, 2), (7, 3, 4)])
def test_batch_examples_ranks_disjoint_and_cover_epoch(n, batch_size, world_size):
    examples = _examples(n)
    per_rank = [
        batch_examples(examples, batch_size, seed=1, epoch=0, rank=r, world_size=world_size, drop_last=False)
        for r in range(world_size)
    ]
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
    seen = [id(ex) for batches in per_rank for batch in batches for ex in batch]
    assert sorted(seen) == sorted(id(ex) for ex in examples)  # each example exactly once
    for batches in per_rank:
        assert all(len(b) <= batch_size for b in batches)

    dropped = [
        batch_examples(examples, batch_size, seed=1, epoch=0, rank=r, world_size=world_size) for r in range(world_size)
    ]
    n_steps = n // (batch_size * world_size)
    for batches in dropped:
        assert len(batches) == n_steps and all(len(b) == batch_size for b in batches)
    seen = [id(ex) for batches in dropped for batch in batches for ex in batch]
    assert len(seen) == len(set(seen)) == n_steps * batch_size * world_size


def test_batch_examples_order_depends_on_seed_and_epoch_only():
    examples = _examples(64)

    def order(**kw):
        return [ex.query for batch in batch_examples(examples, 8, **kw) for ex in batch]

    first = order(seed=3, epoch=0)
    assert first == order(seed=3, epoch=0)
    assert first != order(seed=3, epoch=1)
    assert first != order(seed=4, epoch=0)
    assert sorted(first) == sorted(order(seed=3, epoch=1))
    assert first != [ex.query for ex in examples]  # actually shuffled
    # rank slices of one global batch are the consecutive pieces of the single-process order
    global_order = order(seed=3, epoch=2)
    rank1 = [b for b in batch_examples(examples, 4, seed=3, epoch=2, rank=1, world_size=2)]
    assert [ex.query for ex in rank1[0]] == global_order[4:8]


def test_batch_examples_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        batch_examples(_examples(4), 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="rank"):
        batch_examples(_examples(4), 2, seed=0, epoch=0, rank=2, world_size=2)


def test_write_beir_files_read_by_the_eval_loaders(tmp_path):
    eval_data = pytest.importorskip("latentembed.evaluation.data")
    corpus, queries, qrels = retrieval_eval_set(bundled_examples("retrieval"))
    paths = write_beir_files(corpus, queries, qrels, tmp_path)
    assert eval_data.load_corpus(paths["corpus"]) == corpus
    assert eval_data.load_queries(paths["queries"]) == queries
    loaded = eval_data.load_qrels(paths["qrels"], query_ids=queries, corpus_ids=corpus)
    assert loaded == qrels
