"""`latentembed eval --causal --template --instruction` evaluates a base model exactly as
`latentembed train` sees it with the same flags: the trainer's evaluation before training on an
--eval-data set and the eval command on the same files give the same metrics."""

import json

import pytest

from latentembed.evaluation.cli import main as eval_main
from latentembed.training.cli import main as train_main
from latentembed.training.data import retrieval_eval_set, write_beir_files
from tests.test_training_run import _model_for, _slice, _write_jsonl, one_thread  # noqa: F401

INSTRUCTION = "Given a question, find the passage that answers it"


def test_eval_with_the_trainers_prompt_and_attention_matches_the_trainer(tmp_path, capsys, one_thread):
    rows = _slice("retrieval", 40, 3)
    _model_for(rows).save_pretrained(tmp_path / "base")
    paths = write_beir_files(*retrieval_eval_set(rows[24:]), tmp_path / "beir")
    data = _write_jsonl(tmp_path / "train.jsonl", rows[:24])
    flags = ["--causal", "--template", "nvembed", "--instruction", INSTRUCTION, "--max-length", "48"]
    argv = ["--model", str(tmp_path / "base"), "--data", str(data), "--stage2-data", "none", "--steps", "0"]
    argv += [
        "--batch-size",
        "8",
        "--full",
        "--eval-data",
        str(tmp_path / "beir"),
        "--output",
        str(tmp_path / "run"),
        *flags,
    ]
    assert train_main(argv) == 0
    trainer = json.loads((tmp_path / "run" / "metrics.json").read_text())["eval_before"]
    files = ["--corpus", str(paths["corpus"]), "--queries", str(paths["queries"]), "--qrels", str(paths["qrels"])]
    out = tmp_path / "eval.json"
    base = ["--model", str(tmp_path / "base"), *files, "--k", "1,10", "--batch-size", "64", "--json", str(out)]
    assert eval_main([*base, *flags]) == 0
    evaluated = json.loads(out.read_text())
    assert evaluated["causal"] is True and evaluated["template"] == "nvembed"
    for key in ("ndcg@10", "mrr@10", "recall@10", "recall@1"):
        assert evaluated["metrics"][key] == pytest.approx(trainer[key], abs=1e-6), key
    # Without the trainer's attention the base model is another model.
    assert eval_main([*base, "--template", "nvembed", "--instruction", INSTRUCTION, "--max-length", "48"]) == 0
    capsys.readouterr()
    assert json.loads(out.read_text())["metrics"] != evaluated["metrics"]


def test_eval_refuses_an_unknown_template_before_loading(tmp_path, capsys, monkeypatch):
    from latentembed.models.embedding import EmbeddingModel

    monkeypatch.setattr(EmbeddingModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    rows = _slice("retrieval", 8, 0)
    paths = write_beir_files(*retrieval_eval_set(rows), tmp_path / "beir")
    (tmp_path / "m").mkdir()
    argv = ["--model", str(tmp_path / "m"), "--corpus", str(paths["corpus"]), "--queries", str(paths["queries"])]
    assert eval_main([*argv, "--qrels", str(paths["qrels"]), "--template", "nope"]) == 1
    assert "--template: unknown prompt template 'nope'" in capsys.readouterr().err
