"""The eval command and evaluate_retrieval: file:line for bytes that are not UTF-8, and every
check made before the expensive work (model loading, encoding the corpus)."""

import gzip
import json
import random

import pytest
import torch

from latentembed.evaluation import evaluate_retrieval
from latentembed.evaluation.cli import main
from latentembed.evaluation.data import DatasetFormatError, load_corpus, load_qrels, load_queries
from latentembed.models.embedding import EmbeddingModel

from .test_eval_cli import data_files, model_dir  # noqa: F401  (fixtures)


def _latin1_file(path, good_lines: list[str], bad_line: str, at: int):
    lines = [line.encode("utf-8") for line in good_lines]
    lines.insert(at - 1, bad_line.encode("latin-1"))
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.jsonl.gz"])
def test_corpus_with_latin1_bytes_names_file_and_line(tmp_path, name):
    rng = random.Random(name)
    good = [json.dumps({"_id": f"d{i}", "text": f"doc {rng.random()}"}) for i in range(5)]
    at = rng.randint(2, 5)
    path = _latin1_file(tmp_path / name, good, '{"_id": "x", "text": "na\u00efve"}', at)
    with pytest.raises(DatasetFormatError, match=rf"{path}:{at}: not UTF-8 text: byte 0xef at column 25"):
        load_corpus(path)


def test_queries_and_tsv_qrels_with_latin1_bytes_name_file_and_line(tmp_path):
    path = _latin1_file(
        tmp_path / "queries.jsonl", ['{"_id": "q1", "text": "a"}'], '{"_id": "q2", "text": "\u00e9"}', 2
    )
    with pytest.raises(DatasetFormatError, match=rf"{path}:2: not UTF-8"):
        load_queries(path)
    path = _latin1_file(tmp_path / "test.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1"], "q\u00e9\td2\t1", 3)
    with pytest.raises(DatasetFormatError, match=rf"{path}:3: not UTF-8"):
        load_qrels(path)


def test_damaged_gzip_names_the_file(tmp_path):
    path = tmp_path / "corpus.jsonl.gz"
    rows = "".join(json.dumps({"_id": f"d{i}", "text": f"doc {random.random()}"}) + "\n" for i in range(50))
    path.write_bytes(gzip.compress(rows.encode())[:-12])
    with pytest.raises(DatasetFormatError, match=rf"{path}:\d+: damaged gzip data"):
        load_corpus(path)


def test_cli_latin1_corpus_reports_file_line(model_dir, data_files, tmp_path, capsys):  # noqa: F811
    path = _latin1_file(
        tmp_path / "c.jsonl", ['{"_id": "paris", "text": "Paris."}'], '{"_id": "b", "text": "\u00e9"}', 2
    )
    assert main(["--model", str(model_dir), "--corpus", str(path), *data_files[2:]]) == 1
    assert f"{path}:2: not UTF-8" in capsys.readouterr().err


@pytest.fixture
def count_encoded(monkeypatch):
    """Counts the texts EmbeddingModel.encode is given."""
    seen = []
    encode = EmbeddingModel.encode

    def counting(self, texts, **kwargs):
        seen.extend([texts] if isinstance(texts, str) else texts)
        return encode(self, texts, **kwargs)

    monkeypatch.setattr(EmbeddingModel, "encode", counting)
    return seen


def test_cli_unknown_task_fails_before_the_corpus_is_encoded(
    model_dir,
    data_files,
    capsys,
    count_encoded,
):
    assert main(["--model", str(model_dir), *data_files, "--task", "no-such-task"]) == 1
    assert "no-such-task" in capsys.readouterr().err
    assert len(count_encoded) <= 2, f"{len(count_encoded)} texts encoded before the task was refused"


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(EmbeddingModel, "from_pretrained", classmethod(refuse))


def test_cli_unwritable_json_fails_before_the_model_loads(
    model_dir,
    data_files,
    tmp_path,
    capsys,
    no_model_load,
):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["--model", str(model_dir), *data_files, "--json", str(blocker / "scores.json")]) == 1
    assert f"--json {blocker / 'scores.json'}" in capsys.readouterr().err
    assert main(["--model", str(model_dir), *data_files, "--json", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_cli_qrels_without_relevant_documents_fail_before_the_model_loads(
    model_dir,
    data_files,
    tmp_path,  # noqa: F811
    capsys,
    no_model_load,
):
    qrels = tmp_path / "zero.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\tparis\t0\nq2\tbread\t0\n")
    assert main(["--model", str(model_dir), *data_files[:4], "--qrels", str(qrels)]) == 1
    assert "no query has a relevant document" in capsys.readouterr().err


class DimensionsDiffer:
    """An encoder whose queries and documents get different dimensions; counts what it encodes."""

    def __init__(self):
        self.encoded = 0

    def encode(self, texts, side="doc", batch_size=32):
        self.encoded += len(texts)
        return torch.randn(len(texts), 8 if side == "query" else 6)


def test_dimension_mismatch_is_found_before_the_corpus_is_encoded():
    corpus = {f"d{i}": f"document {i} {random.random()}" for i in range(50)}
    queries = {"q1": "a question", "q2": "another"}
    qrels = {"q1": {"d3": 1}, "q2": {"d7": 2}}
    encoder = DimensionsDiffer()
    with pytest.raises(ValueError, match="queries embed to dimension 8, documents to 6"):
        evaluate_retrieval(encoder, corpus, queries, qrels, query_kwargs={"side": "query"})
    assert encoder.encoded <= 2
