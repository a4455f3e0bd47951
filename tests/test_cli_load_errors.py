"""The train and eval commands name the flag the user typed (``--pooling``), not the Python
argument it becomes (``pooling=``), when a model directory does not fit it."""

import json

import pytest

from latentembed.evaluation.cli import main as eval_main
from latentembed.models.checkpoint import save_decoder
from latentembed.models.decoder import DecoderModel
from latentembed.models.decoder_config import DecoderConfig
from latentembed.models.embedding import EmbeddingModel
from latentembed.models.embedding_config import EmbeddingConfig
from latentembed.tokenization import TextTokenizer
from latentembed.training.cli import main as train_main
from tests.tokenizer_helpers import raw_tokenizer


def _config() -> DecoderConfig:
    return DecoderConfig(
        vocab_size=200,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_load_errors")
    tok = TextTokenizer(raw_tokenizer("wordpiece"), bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]")
    own = EmbeddingModel(_config(), EmbeddingConfig(pooling="mean"), tokenizer=tok)
    own.save_pretrained(root / "own")
    plain = DecoderModel(_config())
    save_decoder(plain, root / "plain")
    tok.save_pretrained(root / "plain")
    corpus, queries, qrels = root / "corpus.jsonl", root / "queries.jsonl", root / "qrels.jsonl"
    corpus.write_text(json.dumps({"_id": "d", "text": "a document"}) + "\n")
    queries.write_text(json.dumps({"_id": "q", "text": "a query"}) + "\n")
    qrels.write_text(json.dumps({"query-id": "q", "corpus-id": "d", "score": 1}) + "\n")
    data = ["--corpus", str(corpus), "--queries", str(queries), "--qrels", str(qrels), "--device", "cpu"]
    return root, data


@pytest.mark.parametrize(
    "kind, extra, expected",
    [
        ("own", ["--pooling", "last"], "--pooling last does not match"),
        ("plain", [], "choose its pooling with --pooling"),
        ("plain", ["--pooling", "avg"], "--pooling avg is not a pooling mode"),
    ],
)
def test_train_and_eval_name_the_pooling_flag(dirs, capsys, kind, extra, expected):
    root, data = dirs
    assert train_main(["--model", str(root / kind), "--stage2-data", "none", "--steps", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert expected in err and "pooling=" not in err, err
    assert eval_main(["--model", str(root / kind), *data, *extra]) == 1
    err = capsys.readouterr().err
    assert expected in err and "pooling=" not in err and str(root / kind) in err, err
