"""BEIR-style corpus / queries / qrels loaders: formats, title handling and file:line errors."""

import gzip
import json

import pytest

from latentembed.evaluation.data import (
    DatasetFormatError,
    check_qrels,
    load_corpus,
    load_qrels,
    load_queries,
    load_retrieval_dataset,
)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _jsonl(path, rows):
    return _write(path, [json.dumps(r) for r in rows])


def test_corpus_titles_and_order(tmp_path):
    rows = [
        {"_id": "d2", "title": "Paris", "text": "is the capital of France."},
        {"_id": "d1", "text": "No title here."},
        {"_id": "d3", "title": "", "text": "Empty title."},
        {"_id": 7, "title": None, "text": "Null title, integer id."},
        {"_id": "d4", "title": "Only a title", "text": ""},
    ]
    path = _jsonl(tmp_path / "corpus.jsonl", rows)
    corpus = load_corpus(path)
    assert list(corpus) == ["d2", "d1", "d3", "7", "d4"]
    assert corpus["d2"] == "Paris is the capital of France."
    assert corpus["d1"] == "No title here."
    assert corpus["d3"] == "Empty title."
    assert corpus["7"] == "Null title, integer id."
    assert corpus["d4"] == "Only a title "


def test_queries_blank_lines_and_gzip(tmp_path):
    lines = [json.dumps({"_id": "q1", "text": "what is paris"}), "", "  ", json.dumps({"_id": "q2", "text": "ünïcode"})]
    assert load_queries(_write(tmp_path / "q.jsonl", lines)) == {"q1": "what is paris", "q2": "ünïcode"}
    gz = tmp_path / "q.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    assert load_queries(gz) == {"q1": "what is paris", "q2": "ünïcode"}


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"_id": "d1", "text": "a"}', '{"text": "b"}'], r"corpus.jsonl:2: missing field '_id'"),
        (['{"_id": "d1", "text": "a"}', "", '{"_id": "d2"}'], r"corpus.jsonl:3: missing field 'text'"),
        (['{"_id": "d1", "text": null}'], r"corpus.jsonl:1: missing field 'text'"),
        (['{"_id": "d1", "text": 5}'], r"corpus.jsonl:1: field 'text' must be a string"),
        (['{"_id": "d1", "title": 3, "text": "x"}'], r"corpus.jsonl:1: field 'title' must be a string"),
        (['{"_id": ["d1"], "text": "x"}'], r"corpus.jsonl:1: field '_id' must be a string id"),
        (['{"_id": "", "text": "x"}'], r"corpus.jsonl:1: field '_id' is empty"),
        (
            ['{"_id": "d1", "text": "a"}', '{"_id": "d1", "text": "b"}'],
            r"corpus.jsonl:2: duplicate document id 'd1' \(first at .*corpus.jsonl:1\)",
        ),
        (
            [
                '{"_id": "d1", "text": "a"',
            ],
            r"corpus.jsonl:1: invalid JSON",
        ),
        (['["d1", "a"]'], r"corpus.jsonl:1: expected a JSON object, got list"),
    ],
)
def test_corpus_errors_name_file_and_line(tmp_path, lines, message):
    path = _write(tmp_path / "corpus.jsonl", lines)
    with pytest.raises(DatasetFormatError, match=message):
        load_corpus(path)


def test_query_errors(tmp_path):
    with pytest.raises(DatasetFormatError, match=r"queries.jsonl:2: duplicate query id 'q1'"):
        load_queries(_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "a"}, {"_id": "q1", "text": "b"}]))
    with pytest.raises(DatasetFormatError, match=r"queries.jsonl:1: missing field 'text'"):
        load_queries(_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "query": "a"}]))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_queries(tmp_path / "nope.jsonl")


QRELS = {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 2}}


def _qrels_files(tmp_path):
    rows = [("q1", "d1", 1), ("q1", "d2", 0), ("q2", "d3", 2)]
    jsonl = _jsonl(tmp_path / "qrels.jsonl", [{"query-id": q, "corpus-id": d, "score": s} for q, d, s in rows])
    tsv = _write(tmp_path / "test.tsv", ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in rows])
    sniff_json = _write(tmp_path / "qrels_json", jsonl.read_text().splitlines())
    sniff_tsv = _write(tmp_path / "qrels_tsv", tsv.read_text().splitlines())
    return [jsonl, tsv, sniff_json, sniff_tsv]


def test_qrels_jsonl_tsv_and_sniffing_agree(tmp_path):
    for path in _qrels_files(tmp_path):
        assert load_qrels(path) == QRELS, path


@pytest.mark.parametrize(
    "lines,message",
    [
        (
            ["query-id\tcorpus-id\tscore", "q1\td1"],
            r"test.tsv:2: expected 3 tab-separated fields, got missing field 'score'",
        ),
        (["q1\td1\t1"], r"test.tsv:1: expected the TSV header"),
        (["query-id\tcorpus-id\tscore", "q1\td1\thigh"], r"test.tsv:2: score must be an integer, got 'high'"),
        (["query-id\tcorpus-id\tscore", "q1\td1\t1.5"], r"test.tsv:2: score must be an integer"),
        (
            ["query-id\tcorpus-id\tscore", "q1\td1\t1", "", "q1\td1\t2"],
            r"test.tsv:4: duplicate qrels row for query 'q1', document 'd1'",
        ),
        (["query-id\tcorpus-id\tscore", "\td1\t1"], r"test.tsv:2: field 'query-id' is empty"),
    ],
)
def test_qrels_tsv_errors(tmp_path, lines, message):
    path = _write(tmp_path / "test.tsv", lines)
    with pytest.raises(DatasetFormatError, match=message):
        load_qrels(path)


def test_qrels_jsonl_errors_and_unknown_ids(tmp_path):
    path = _jsonl(tmp_path / "qrels.jsonl", [{"query-id": "q1", "corpus-id": "d1"}])
    with pytest.raises(DatasetFormatError, match=r"qrels.jsonl:1: missing field 'score'"):
        load_qrels(path)
    path = _jsonl(tmp_path / "qrels.jsonl", [{"query-id": "q1", "score": 1}])
    with pytest.raises(DatasetFormatError, match=r"qrels.jsonl:1: missing field 'corpus-id'"):
        load_qrels(path)
    path = _jsonl(
        tmp_path / "qrels.jsonl",
        [{"query-id": "q1", "corpus-id": "d1", "score": 1.0}, {"query-id": "q9", "corpus-id": "d1", "score": 1}],
    )
    assert load_qrels(path) == {"q1": {"d1": 1}, "q9": {"d1": 1}}
    with pytest.raises(DatasetFormatError, match=r"qrels.jsonl:2: unknown query id 'q9'"):
        load_qrels(path, query_ids={"q1"})
    with pytest.raises(DatasetFormatError, match=r"qrels.jsonl:1: unknown document id 'd1'"):
        load_qrels(path, corpus_ids={"d2"})


def test_load_retrieval_dataset_checks_ids(tmp_path):
    corpus = _jsonl(tmp_path / "corpus.jsonl", [{"_id": f"d{i}", "text": f"doc {i}"} for i in (1, 2)])
    queries = _jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "query"}])
    qrels = _jsonl(tmp_path / "qrels.jsonl", [{"query-id": "q1", "corpus-id": "d3", "score": 1}])
    with pytest.raises(DatasetFormatError, match=r"qrels.jsonl:1: unknown document id 'd3' \(not in the corpus\)"):
        load_retrieval_dataset(corpus, queries, qrels)
    _jsonl(qrels, [{"query-id": "q1", "corpus-id": "d2", "score": 1}])
    c, q, r = load_retrieval_dataset(corpus, queries, qrels)
    assert (c, q, r) == ({"d1": "doc 1", "d2": "doc 2"}, {"q1": "query"}, {"q1": {"d2": 1}})
    check_qrels(r, q, c)
    with pytest.raises(ValueError, match="unknown query id 'q2'"):
        check_qrels({"q2": {"d1": 1}}, q, c)
    with pytest.raises(ValueError, match=r"qrels\['q1'\]: unknown document id 'dx'"):
        check_qrels({"q1": {"dx": 1}}, q, c)
