"""`python -m latentembed eval` end to end with a tiny saved EmbeddingModel and a JSONL/TSV set."""

import json

import pytest
import torch

from latentembed.__main__ import main as latentembed_main
from latentembed.evaluation import evaluate_retrieval, load_retrieval_dataset
from latentembed.evaluation.cli import main
from tests.tokenizer_helpers import VOCAB_SIZE, build_tokenizer

DOCS = [
    ("paris", "Paris", "Paris is the capital and largest city of France."),
    ("bread", "", "Bread is made from flour, water, salt and yeast; it is baked in an oven."),
    ("fox", None, "The quick brown fox jumps over the lazy dog."),
    ("tokens", "Tokenizers", "Tokenizers split text into tokens; offsets map each token back to its characters."),
    ("pooling", "", "Latent attention pooling, mean pooling and last-token pooling give sentence vectors."),
]
QUERIES = [
    ("q1", "what is the capital of france?"),
    ("q2", "how do I bake bread?"),
    ("q3", "what do tokenizers do?"),
    ("q4", "a query nobody judged"),
]
QRELS = [("q1", "paris", 1), ("q2", "bread", 2), ("q2", "fox", 0), ("q3", "tokens", 1), ("q4", "fox", 0)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from latentembed.models.decoder_config import DecoderConfig
    from latentembed.models.embedding import EmbeddingModel
    from latentembed.models.embedding_config import EmbeddingConfig
    from latentembed.tokenization import TextTokenizer

    root = tmp_path_factory.mktemp("eval_cli")
    tok = build_tokenizer("bpe", root / "tokenizer")
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = EmbeddingModel(
        cfg, EmbeddingConfig(pooling="mean", prompt_template="e5"), tokenizer=TextTokenizer.from_pretrained(tok)
    )
    model.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture
def data_files(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in DOCS))
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"_id": i, "text": x}) + "\n" for i, x in QUERIES))
    qrels = tmp_path / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in QRELS))
    return ["--corpus", str(corpus), "--queries", str(queries), "--qrels", str(qrels)]


def test_eval_cli_end_to_end(model_dir, data_files, tmp_path, capsys):
    out = tmp_path / "scores.json"
    argv = [
        "--model",
        str(model_dir),
        *data_files,
        "--task",
        "retrieval",
        "--k",
        "1,3,10",
        "--batch-size",
        "2",
        "--max-length",
        "64",
        "--device",
        "cpu",
        "--json",
        str(out),
    ]
    assert latentembed_main(["eval", *argv]) == 0
    printed = capsys.readouterr().out
    assert "ndcg" in printed and "mrr" in printed and "recall" in printed and "@10" in printed
    assert "queries: 3 evaluated, 1 skipped" in printed
    result = json.loads(out.read_text())
    assert result["k_values"] == [1, 3, 10] and result["task"] == "retrieval"
    assert set(result["metrics"]) == {f"{m}@{k}" for m in ("ndcg", "mrr", "recall") for k in (1, 3, 10)}
    assert all(0.0 <= v <= 1.0 for v in result["metrics"].values())
    assert result["metrics"]["recall@10"] == 1.0  # 5 documents, all retrieved
    assert (result["num_queries"], result["num_queries_skipped"], result["num_docs"], result["embedding_dim"]) == (
        3,
        1,
        5,
        32,
    )

    # the same numbers as the library call on the same model and data
    from latentembed.models.embedding import EmbeddingModel

    model = EmbeddingModel.from_pretrained(model_dir, device="cpu")
    corpus, queries, qrels = load_retrieval_dataset(*data_files[1::2])
    direct = evaluate_retrieval(
        model,
        corpus,
        queries,
        qrels,
        k_values=(1, 3, 10),
        batch_size=2,
        query_kwargs={"task": "retrieval", "max_length": 64},
        doc_kwargs={"max_length": 64},
    )
    for key, value in result["metrics"].items():
        assert value == pytest.approx(direct[key], abs=1e-6), key


def test_eval_cli_instruction_and_doc_task(model_dir, data_files, capsys):
    argv = [
        "--model",
        str(model_dir),
        *data_files,
        "--instruction",
        "Find the passage that answers",
        "--doc-task",
        "document",
        "--dtype",
        "float32",
        "--k",
        "5",
    ]
    assert main(argv) == 0
    assert "@5" in capsys.readouterr().out


def test_eval_cli_errors(model_dir, data_files, tmp_path, capsys):
    base = ["--model", str(model_dir), *data_files]
    missing = tmp_path / "missing.jsonl"
    assert main(["--model", str(model_dir), "--corpus", str(missing), *data_files[2:]]) == 1
    assert f"--corpus: no such file: {missing}" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nomodel"), *data_files]) == 1
    assert "--model: no such directory" in capsys.readouterr().err
    (tmp_path / "empty_model").mkdir()
    assert main(["--model", str(tmp_path / "empty_model"), *data_files]) == 1
    assert "config.json" in capsys.readouterr().err
    assert main([*base, "--task", "no-such-task"]) == 1
    assert "no-such-task" in capsys.readouterr().err
    bad = tmp_path / "bad_corpus.jsonl"
    bad.write_text('{"_id": "d1", "text": "ok"}\n{"_id": "d2"}\n')
    assert main(["--model", str(model_dir), "--corpus", str(bad), *data_files[2:]]) == 1
    assert "bad_corpus.jsonl:2: missing field 'text'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda"]) == 1
        assert "CUDA is not available" in capsys.readouterr().err
    for bad_args in (["--k", "0,5"], ["--k", "ten"], ["--dtype", "int8"], ["--batch-size", "0"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as exc:
            main([*base, *bad_args])
        assert exc.value.code == 2, bad_args
    with pytest.raises(SystemExit) as exc:
        main(["--corpus", "x"])  # --model, --queries, --qrels missing
    assert exc.value.code == 2
