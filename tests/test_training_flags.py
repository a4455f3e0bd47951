"""The train command's new flags fail fast: every bad flag and combination errors, naming the
flag, before any model is built or loaded; a fresh run refuses an --output holding an earlier
run's checkpoints; a resume with settings that would make the result meaningless is refused
with the list of differences, harmless ones are allowed and said."""

import json
import shutil

import pytest

from latentembed.training.cli import main as cli_main
from latentembed.training.trainer import TrainConfig, train
from tests.test_training_input_errors import ModelBuilt, _rows, _write, no_model  # noqa: F401


def _run(argv, capsys) -> tuple[int, str]:
    code = cli_main(argv)
    return code, capsys.readouterr().err


def _tensorboard_missing() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--save-every", "5"], "--save-every 5 needs --output DIR"),
        (["--keep-last", "2", "--output", "{out}"], "--keep-last 2 needs --save-every"),
        (["--keep-best", "--output", "{out}"], "--keep-best keeps the checkpoint of the best evaluation"),
        (["--resume", "latest"], "--resume latest resumes from DIR/checkpoints: it needs --output"),
        (["--resume", "{tmp}/nowhere"], "not a checkpoint directory (no trainer_state.json)"),
        (["--merge-on-save", "--output", "{out}"], "--merge-on-save folds the LoRA adapter"),
        (["--merge-on-save", "--no-full"], "needs LoRA (--no-full) and --output"),
        (["--eval-data", "{tmp}", "--eval-fraction", "0.1"], "pass one evaluation set"),
        (["--eval-every", "3", "--no-eval"], "--no-eval contradicts --eval-every"),
        (["--eval-every", "3", "--eval-fraction", "0"], "--eval-every 3: nothing to evaluate on"),
        (["--eval-group-key", "doc", "--eval-fraction", "0"], "--eval-group-key doc holds out whole groups"),
        (["--eval-data", "{tmp}/missing"], "--eval-data {tmp}/missing: not found"),
        (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1), got 1.5"),
        (["--eval-fraction", "1.5"], "--eval-fraction must be in [0, 1), got 1.5"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--temperature", "5", "--learnable-temperature"], "--temperature 5.0: temperature 5.0 must lie in"),
        (["--no-in-batch-negatives", "--hard-negatives", "0"], "leaves a stage-1 query no negative at all"),
        (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
        (["--log-file", "{tmp}"], "--log-file {tmp}: is a directory"),
    ],
)
def test_bad_combinations_fail_before_the_data_and_the_model(argv, message, tmp_path, capsys, no_model, monkeypatch):
    from latentembed.training import plan

    monkeypatch.setattr(plan, "read_examples", lambda *a: pytest.fail("the data was read before the check"))
    monkeypatch.setattr(plan, "bundled_examples", lambda *a: pytest.fail("the data was read before the check"))
    fill = {"tmp": str(tmp_path), "out": str(tmp_path / "out")}
    code, err = _run([a.format(**fill) for a in argv], capsys)
    assert code == 2 and message.format(**fill) in err, err


@pytest.mark.skipif(not _tensorboard_missing(), reason="tensorboard is installed here")
def test_report_to_tensorboard_without_the_package_says_so_before_the_model(tmp_path, capsys, no_model):
    code, err = _run(["--report-to", "tensorboard", "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and "--report-to tensorboard: the tensorboard package is not installed" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--eval-group-key", "doc"], "--eval-group-key doc: the bundled retrieval rows have no such field"),
        (["--grad-accum", "50", "--epochs", "1"], "make no step of --grad-accum 50 batches"),
    ],
)
def test_data_dependent_combinations_fail_before_the_model(argv, message, capsys, no_model):
    code, err = _run(argv, capsys)
    assert code == 2 and message in err, err


@pytest.mark.parametrize(
    "argv", [["--grad-accum", "0"], ["--grad-cache", "0"], ["--dtype", "float64"], ["--schedule", "step"]]
)
def test_bad_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 2 and argv[0] in capsys.readouterr().err


def test_group_key_rows_must_carry_the_field(tmp_path, capsys, no_model):
    rows = [dict(r, doc=f"d{i // 3}") for i, r in enumerate(_rows(12, seed=1))]
    del rows[7]["doc"]
    path = _write(tmp_path / "g.jsonl", rows)
    code, err = _run(["--data", path, "--eval-group-key", "doc", "--batch-size", "2"], capsys)
    assert code == 2 and f"{path}:8: field 'doc' (the --eval-group-key)" in err


def _checkpointed_run(tmp_path, **extra) -> TrainConfig:
    """A 2-step run of the tiny model with a checkpoint at step 2, on small data."""
    data = _write(tmp_path / "train.jsonl", _rows(24, seed=3))
    cfg = TrainConfig(
        data=data,
        steps=2,
        batch_size=4,
        eval=False,
        save_every=2,
        output=str(tmp_path / "out"),
        quiet=True,
        max_length=32,
        **extra,
    )
    train(cfg)
    return cfg


def test_a_fresh_run_refuses_an_output_with_checkpoints_and_resume_checks_the_settings(tmp_path, capsys, monkeypatch):
    cfg = _checkpointed_run(tmp_path)
    out = cfg.output
    argv = ["--data", cfg.data, "--steps", "2", "--batch-size", "4", "--no-eval", "--max-length", "32"]
    code, err = _run([*argv, "--output", out], capsys)
    assert code == 2 and "holds 1 checkpoint(s) of an earlier run (newest step-00000002)" in err
    assert "--resume latest" in err

    from tests.test_training_input_errors import ModelBuilt as Built

    def refuse(*a, **k):
        raise Built

    from latentembed.training import model_setup

    monkeypatch.setattr(model_setup, "tiny_model", refuse)
    # Settings that decide the result: refused, every difference listed, before the model.
    changed = [*argv, "--output", out, "--resume", "latest", "--batch-size", "3", "--lr", "0.01", "--seed", "7"]
    code, err = _run(changed, capsys)
    assert code == 2 and "this run differs from the checkpoint's in what decides the result" in err
    for line in ("batch_size: 4 in the checkpoint, 3 now", "lr: 0.002 in the checkpoint, 0.01 now", "seed: 0 in"):
        assert line in err, err
    # The data file's content.
    rows = _rows(24, seed=3)
    rows[0]["query"] = "another question?"
    _write(tmp_path / "train.jsonl", rows)
    code, err = _run([*argv, "--output", out, "--resume", "latest"], capsys)
    assert code == 2 and "data: the file's content differs from the checkpoint's run (sha256)" in err
    _write(tmp_path / "train.jsonl", _rows(24, seed=3))
    # More steps and another log interval: allowed, and said.
    with pytest.raises(Built):
        cli_main([*argv, "--output", out, "--resume", "latest", "--steps", "5", "--log-every", "1"])
    said = capsys.readouterr().out
    assert "changed settings that keep it meaningful" in said and "steps: 2 in the checkpoint, 5 now" in said


def test_resume_latest_without_checkpoints_starts_from_the_beginning(tmp_path, capsys):
    data = _write(tmp_path / "train.jsonl", _rows(16, seed=4))
    out = tmp_path / "out"
    argv = [
        "--data",
        data,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--no-eval",
        "--max-length",
        "32",
        "--output",
        str(out),
    ]
    assert cli_main([*argv, "--resume", "latest", "--save-every", "1"]) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    state = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["loop"]["global_step"] == 2 and len(state["result"]["loss_history"]) == 2
    # A finished run's --resume latest continues from its last checkpoint (nothing left to do).
    shutil.rmtree(out / "model")
    assert cli_main([*argv, "--resume", "latest", "--save-every", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["loss_history"]] == [1, 2] and metrics["resumed_from"].endswith("step-00000002")


def test_resume_on_other_frozen_weights_is_refused(tmp_path, capsys):
    from latentembed.training.tiny import tiny_model, train_tokenizer

    rows = _rows(24, seed=5)
    texts = [t for r in rows for t in (r["query"], r["positive"], *r["negatives"])]
    tok = train_tokenizer(texts + ["query: passage:"])
    tiny_model(tok, num_hidden_layers=1).save_pretrained(tmp_path / "base")
    data = _write(tmp_path / "train.jsonl", rows)
    argv = ["--model", str(tmp_path / "base"), "--data", data, "--steps", "2", "--batch-size", "4", "--no-eval"]
    argv += ["--lora-rank", "2", "--max-length", "96", "--save-every", "2", "--output", str(tmp_path / "out")]
    assert cli_main(argv) == 0
    tiny_model(tok, num_hidden_layers=1).save_pretrained(tmp_path / "base")  # other random weights, same path
    capsys.readouterr()
    code, err = _run([*argv, "--resume", "latest", "--steps", "3"], capsys)
    assert code == 2 and "frozen weights: the model's weights that do not train differ" in err


def test_stage_negatives_and_the_own_pooling_are_accepted():
    from latentembed.training.config import check_config
    from latentembed.training.plan import RunData, TrainingExample, plan_stages

    check_config(TrainConfig(pooling="mean"), model=None)  # the tiny model's own pooling
    rows = [TrainingExample(f"q{i}", f"p{i}") for i in range(8)]
    data = RunData(rows, "s1", rows[:4], "s2", rows, [], rows + rows[:4])
    cfg = TrainConfig(batch_size=4, hard_negatives=0, stage2_in_batch_negatives=True, steps=2)
    stages = plan_stages(cfg, data, tiny=True, lr=1e-3, rank=0, world_size=1)
    assert [(s.number, s.in_batch_negatives) for s in stages] == [(1, True), (2, True)]
    cfg = TrainConfig(batch_size=4, hard_negatives=1, in_batch_negatives=False, stage2_steps=0, steps=2)
    assert [
        (s.number, s.in_batch_negatives) for s in plan_stages(cfg, data, tiny=True, lr=1, rank=0, world_size=1)
    ] == [(1, False)]
    with pytest.raises(ValueError, match="with hard_negatives=0 its loss is 0"):
        plan_stages(TrainConfig(batch_size=4, hard_negatives=0, steps=2), data, tiny=True, lr=1, rank=0, world_size=1)


def test_an_in_memory_model_keeps_its_attention(tmp_path):
    from latentembed.training.tiny import tiny_model, train_tokenizer

    model = tiny_model(train_tokenizer(["a b c"]), causal=False)
    with pytest.raises(ValueError, match="causal=True: the in-memory model was built with causal=False"):
        train(TrainConfig(causal=True, quiet=True), model=model)
