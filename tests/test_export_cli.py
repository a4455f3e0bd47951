"""`latentembed convert` and `train --export sentence-transformers`: the directories they write load
in sentence-transformers and encode as latentembed does; bad requests fail with exit code 2."""

from __future__ import annotations

import os

import pytest
import torch

from latentembed.__main__ import main as cli
from latentembed.models.embedding import EmbeddingModel
from latentembed.modules.lora import multi_lora_layers
from latentembed.training.config import TrainConfig
from latentembed.training.output import save_output
from latentembed.training.tiny import tiny_model, train_tokenizer
from tests.models.embedding_helpers import plain_decoder_dir

st = pytest.importorskip("sentence_transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEXTS = ["how do I bake bread?", "Bread is made from flour, water, salt and yeast.", "hello"]


def st_encode(path, **kwargs):
    return st.SentenceTransformer(str(path), device="cpu").encode(TEXTS, convert_to_tensor=True, **kwargs)


def test_convert_a_plain_decoder(tmp_path, capsys):
    src = plain_decoder_dir(tmp_path / "src", family="qwen2", tokenizer="bpe")
    code = cli(["convert", str(src), str(tmp_path / "st"), "--pooling", "last", "--prompt-template", "e5"])
    assert code == 0 and "wrote" in capsys.readouterr().out
    ours = EmbeddingModel.from_pretrained(src, pooling="last", prompt_template="e5")
    torch.testing.assert_close(
        st_encode(tmp_path / "st", prompt_name="query"), ours.encode(TEXTS, task="retrieval"), atol=2e-6, rtol=0
    )


def test_convert_errors_name_the_flag(tmp_path, capsys):
    src = plain_decoder_dir(tmp_path / "src", family="mistral")
    assert cli(["convert", str(src), str(tmp_path / "st")]) == 2
    assert "choose its pooling with --pooling" in capsys.readouterr().err
    assert (
        cli(
            ["convert", str(src), str(tmp_path / "st"), "--pooling", "mean", "--format", "latentembed", "--per-adapter"]
        )
        == 2
    )
    assert "--per-adapter writes sentence-transformers directories" in capsys.readouterr().err


def test_convert_multi_adapter_per_adapter(tmp_path, capsys):
    model = tiny_model(
        train_tokenizer(["a small vocabulary for the export tests", "query passage"]),
        template="none",
        num_hidden_layers=1,
    )
    model.add_adapters(["query", "passage"], rank=2)
    with torch.no_grad():
        for _, layer in multi_lora_layers(model):
            layer.lora_b.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "src")
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "st")]) == 2
    assert "pass adapter=<name>" in capsys.readouterr().err
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "st"), "--per-adapter"]) == 0
    for name in ("query", "passage"):
        expected = model.encode(TEXTS, task=name)
        torch.testing.assert_close(st_encode(tmp_path / "st" / name), expected, atol=2e-6, rtol=0)


def test_train_output_exports(tmp_path):
    model = tiny_model(
        train_tokenizer(["a small vocabulary for the export tests"]), template="none", num_hidden_layers=1
    )
    out = tmp_path / "run"
    save_output(model, TrainConfig(output=str(out), export="sentence-transformers"), {"stages": []}, full=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json",
        "model",
        "sentence-transformers",
        "train_config.json",
    ]
    torch.testing.assert_close(st_encode(out / "sentence-transformers"), model.encode(TEXTS), atol=2e-6, rtol=0)


def test_train_export_flag_needs_output(capsys):
    from latentembed.training.cli import main as train_main

    assert train_main(["--export", "sentence-transformers", "--steps", "1", "--no-eval"]) == 2
    assert "--export writes DIR/sentence-transformers" in capsys.readouterr().err
