"""`train --output DIR` replaces DIR whole: model/, adapters/, train_config.json and metrics.json
are all of one run, and a directory with a user's own files is refused before training starts.
(The SIGKILL trials of the same save are in test_save_sigkill.py.)"""

import json

import torch

from latentembed.models.embedding import EmbeddingModel
from latentembed.training.cli import main as cli_main
from latentembed.training.config import TrainConfig
from latentembed.training.output import save_output
from latentembed.training.tiny import tiny_model, train_tokenizer


def _model(adapters: bool) -> EmbeddingModel:
    model = tiny_model(
        train_tokenizer(["a small vocabulary for the output tests", "query passage"]), num_hidden_layers=1
    )
    if adapters:
        model.add_adapters(["query", "passage"], rank=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _result() -> dict:
    return {"loss_history": [{"stage": 1, "step": 1, "loss": float(torch.rand(()))}], "stages": []}


def test_a_full_run_over_a_lora_run_leaves_no_adapters_of_the_old_run(tmp_path):
    out = tmp_path / "run"
    save_output(_model(adapters=True), TrainConfig(output=str(out), seed=1), _result(), full=False)
    assert (out / "adapters" / "query").is_dir()
    new, result = _model(adapters=False), _result()
    save_output(new, TrainConfig(output=str(out), seed=2), result, full=True)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model", "train_config.json"]
    assert json.loads((out / "train_config.json").read_text())["seed"] == 2
    assert json.loads((out / "metrics.json").read_text()) == result
    loaded = EmbeddingModel.from_pretrained(out / "model")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in new.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_output_directory_with_other_files_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = cli_main(["--output", str(out), "--steps", "1", "--no-eval", "--stage2-steps", "0"])
    err = capsys.readouterr()
    assert code == 2 and "notes.txt" in err.err and str(out) in err.err
    assert "step" not in err.out  # refused before any training step
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
