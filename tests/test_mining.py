"""Hard-negative mining: the mined negatives equal a brute-force reference (every score, sorted,
the positives and the candidates above the margin rule dropped), a query's positives are never
its negatives, ``python -m latentembed mine`` writes rows the trainer reads, bad arguments fail
naming the argument."""

import dataclasses

import pytest
import torch

from latentembed.__main__ import main as cli_main
from latentembed.training.data import TrainingExample, read_examples
from latentembed.training.mining import mine_hard_negatives
from latentembed.training.tiny import tiny_model, train_tokenizer, vocabulary_texts
from tests.test_training_run import _slice, _write_jsonl


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are too small for more
    rows = _slice("retrieval", 24, 3)
    model = tiny_model(train_tokenizer(vocabulary_texts(rows), vocab_size=512), max_length=128)
    yield model, rows
    torch.set_num_threads(threads)


def _reference(model, rows, *, num, candidates, ratio, margin):
    """Every query against every document, in plain Python."""
    texts = list(dict.fromkeys(t for ex in rows for t in (ex.positive, *ex.negatives)))
    docs = model.encode(texts)
    queries = model.encode([ex.query for ex in rows], task="retrieval")
    out = []
    for i, ex in enumerate(rows):
        scores = (queries[i : i + 1] @ docs.T)[0].tolist()
        pos = scores[texts.index(ex.positive)]
        ceiling = pos * ratio if pos > 0 else pos
        if margin is not None:
            ceiling = min(ceiling, pos - margin)
        own = {e.positive for e in rows if e.query == ex.query}
        ranked = sorted(range(len(texts)), key=lambda j: (-scores[j], j))[: candidates + 1]
        keep = [texts[j] for j in ranked if texts[j] not in own and scores[j] <= ceiling]
        out.append(keep[:num])
    return out


@pytest.mark.parametrize("ratio, margin", [(0.95, None), (0.999, 0.0005), (1.0, None)])
def test_mined_negatives_equal_the_brute_force_rule(setup, ratio, margin):
    model, rows = setup
    mined, stats = mine_hard_negatives(
        model, rows, num_negatives=3, candidates=10, max_score_ratio=ratio, absolute_margin=margin
    )
    want = _reference(model, rows, num=3, candidates=10, ratio=ratio, margin=margin)
    assert [ex.negatives for ex in mined] == want
    assert [dataclasses.replace(ex, negatives=[]) for ex in mined] == [
        dataclasses.replace(ex, negatives=[]) for ex in rows
    ]
    assert stats.rows == len(rows) and stats.negatives == sum(len(n) for n in want)
    assert 0 < stats.dropped_positive <= len(rows)  # a query's positive is never its negative
    if ratio < 1:
        assert stats.dropped_margin > 0  # the rule was exercised (a random model scores everything alike)


def test_a_repeated_query_never_gets_its_other_positive(setup):
    model, rows = setup
    twin = TrainingExample(rows[0].query, rows[1].positive)
    mined, _ = mine_hard_negatives(model, [rows[0], twin, *rows[2:]], num_negatives=5, max_score_ratio=1.0)
    for ex in mined[:2]:
        assert rows[0].positive not in ex.negatives and rows[1].positive not in ex.negatives
        assert len(ex.negatives) == 5


def test_cli_writes_training_rows(setup, tmp_path, capsys):
    model, rows = setup
    model.save_pretrained(tmp_path / "model")
    data = _write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "mined.jsonl"
    argv = ["mine", "--model", str(tmp_path / "model"), "--data", str(data), "--output", str(out)]
    assert cli_main([*argv, "--num-negatives", "2", "--candidates", "8"]) == 0
    assert "mined" in capsys.readouterr().out
    got = read_examples(out)
    want, _ = mine_hard_negatives(model, rows, num_negatives=2, candidates=8)
    assert [ex.negatives for ex in got] == [ex.negatives for ex in want]
    assert cli_main([*argv, "--max-score-ratio", "1.5"]) == 1
    assert "max_score_ratio: expected a number in (0, 1], got 1.5" in capsys.readouterr().err
    assert cli_main(["mine", "--model", str(tmp_path), "--data", str(tmp_path / "no.jsonl"), "--output", "x"]) == 1
    assert "--data: no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_negatives=0), "num_negatives: expected a positive int"),
        (dict(num_negatives=5, candidates=3), "candidates: expected at least num_negatives"),
        (dict(max_score_ratio=0.0), "max_score_ratio: expected a number in"),
        (dict(absolute_margin=-1.0), "absolute_margin: expected a number >= 0"),
    ],
)
def test_bad_arguments_are_named(setup, kwargs, message):
    model, rows = setup
    with pytest.raises(ValueError, match=message):
        mine_hard_negatives(model, rows, **kwargs)
