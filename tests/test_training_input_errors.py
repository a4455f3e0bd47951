"""The train command's input errors: file:line for bad bytes, clear messages for empty or too
small data, a warning for repeated rows, and every data check made before the model exists."""

import json
import random
import string

import pytest

from latentembed.training import model_setup, plan
from latentembed.training.cli import main as cli_main
from latentembed.training.data import read_examples
from latentembed.training.trainer import TrainConfig, train


class ModelBuilt(Exception):
    """Raised in place of building / loading a model: the run got past every data check."""


@pytest.fixture
def no_model(monkeypatch):
    """Make any model construction raise ModelBuilt, so a test sees what is checked before it."""

    def refuse(*args, **kwargs):
        raise ModelBuilt

    monkeypatch.setattr(model_setup, "tiny_model", refuse)
    monkeypatch.setattr(model_setup.EmbeddingModel, "from_pretrained", classmethod(lambda cls, *a, **k: refuse()))


def _word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9)))


def _rows(n: int, seed: int, negatives: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "query": f"{_word(rng)} {_word(rng)}?",
            "positive": f"{_word(rng)} {_word(rng)} {i}.",
            "negatives": [f"{_word(rng)} {i}-{j}" for j in range(negatives)],
        }
        for i in range(n)
    ]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _run(argv, capsys) -> tuple[int, str]:
    code = cli_main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("line", [2, 5])
def test_latin1_bytes_name_file_line_and_column(tmp_path, capsys, line):
    rows = _rows(6, seed=line)
    lines = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in rows]
    lines[line - 1] = '{"query": "caf\u00e9 au lait", "positive": "x"}'.encode("latin-1")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError) as info:
        read_examples(path)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert "UTF-8" in str(info.value) and "0xe9" in str(info.value) and "column 15" in str(info.value)
    code, err = _run(["--data", str(path), "--no-eval"], capsys)
    assert code == 2 and f"{path}:{line}: " in err and "UTF-8" in err


def test_line_numbers_count_crlf_and_cr_breaks_and_a_bom_is_accepted(tmp_path):
    rows = _rows(4, seed=1)
    text = "\ufeff" + json.dumps(rows[0]) + "\r\n" + json.dumps(rows[1]) + "\r" + json.dumps(rows[2]) + "\n\n"
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(text.encode("utf-8") + b'{"query": "q", "positive": 3}\n')
    with pytest.raises(ValueError, match=rf"{path}:5: field 'positive'"):
        read_examples(path)
    path.write_bytes(text.encode("utf-8"))
    assert [ex.query for ex in read_examples(path)] == [r["query"] for r in rows[:3]]


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_empty_or_blank_data_file_says_so(tmp_path, capsys, no_model, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    code, err = _run(["--data", str(path)], capsys)
    assert code == 2 and str(path) in err and "no rows" in err
    assert "batch-size" not in err


def test_too_few_rows_for_a_batch_fail_before_the_model_with_the_counts(tmp_path, capsys, no_model):
    path = _write(tmp_path / "few.jsonl", _rows(5, seed=3))
    code, err = _run(["--data", path, "--batch-size", "8", "--eval-fraction", "0.2"], capsys)
    assert code == 2 and "4 training rows" in err and "--batch-size" in err and "8" in err


def test_stage2_checks_happen_before_the_model(tmp_path, capsys, no_model):
    stage1 = _write(tmp_path / "s1.jsonl", _rows(12, seed=4))
    stage2_rows = _rows(6, seed=5)
    stage2_rows[3]["negatives"] = [stage2_rows[3]["positive"]]  # a negative equal to the positive is dropped
    stage2 = _write(tmp_path / "s2.jsonl", stage2_rows)
    code, err = _run(["--data", stage1, "--stage2-data", stage2, "--batch-size", "4"], capsys)
    assert code == 2 and f"{stage2}:4" in err and "hard negative" in err
    code, err = _run(["--data", stage1, "--stage2-data", stage2, "--hard-negatives", "0", "--batch-size", "4"], capsys)
    assert code == 2 and "--hard-negatives" in err


def test_bad_dtype_and_pooling_without_model_fail_before_the_model(no_model):
    with pytest.raises(ValueError, match="dtype"):
        train(TrainConfig(dtype="float64", quiet=True))
    with pytest.raises(ValueError, match="pooling='last'"):
        train(TrainConfig(pooling="last", quiet=True))


def test_repeated_rows_are_reported_once_with_a_file_line_pair(tmp_path, no_model):
    rows = _rows(10, seed=6)
    rows = rows[:4] + [rows[1]] * 12 + rows[4:]  # 12 repeats of the row at line 2
    other = dict(rows[7], positive="another answer entirely.")  # same query, another positive
    path = _write(tmp_path / "dups.jsonl", rows + [other])
    with pytest.warns(UserWarning) as record:
        with pytest.raises(ModelBuilt):
            train(TrainConfig(data=path, batch_size=4, quiet=True))
    messages = [str(w.message) for w in record if "repeat" in str(w.message)]
    assert len(messages) == 1, messages
    assert "12 rows repeat" in messages[0] and f"{path}:5 repeats {path}:2" in messages[0]
    assert f"{path}:{len(rows) + 1}" in messages[0] and "false negative" in messages[0]


def test_distinct_rows_give_no_repeat_warning(tmp_path, no_model, recwarn):
    path = _write(tmp_path / "ok.jsonl", _rows(10, seed=7))
    with pytest.raises(ModelBuilt):
        train(TrainConfig(data=path, batch_size=4, quiet=True))
    assert not [w for w in recwarn if "repeat" in str(w.message)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "gpu"], "device 'gpu': expected cpu, cuda or cuda:N"),
        (["--template", "nope"], "unknown prompt template 'nope'"),
    ],
)
def test_bad_device_and_template_fail_before_the_data_and_the_model(argv, message, capsys, no_model, monkeypatch):
    monkeypatch.setattr(plan, "read_examples", lambda *a: pytest.fail("the data was read before the check"))
    monkeypatch.setattr(plan, "bundled_examples", lambda *a: pytest.fail("the data was read before the check"))
    code, err = _run(argv, capsys)
    assert code == 2 and message in err
