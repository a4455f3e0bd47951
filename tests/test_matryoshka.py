"""Matryoshka: the loss over nested prefixes equals the weighted sum of the loss on each
renormalised prefix (values and gradients), ``train --matryoshka`` uses it (a single full
dimension gives the plain loss), ``encode(..., dim=k)`` truncates and renormalises, and bad
dimensions or weights fail naming the argument."""

import json

import pytest
import torch
import torch.nn.functional as F

from latentembed.modules.contrastive import InfoNCELoss
from latentembed.modules.matryoshka import matryoshka_loss
from latentembed.training.cli import main as cli_main
from latentembed.training.tiny import tiny_model, train_tokenizer, vocabulary_texts
from latentembed.training.trainer import TrainConfig, train
from tests.test_training_run import _slice, _write_jsonl


def test_loss_is_the_weighted_sum_over_renormalised_prefixes():
    B, k, D = 5, 2, 37
    q, d, h = (torch.randn(*shape, requires_grad=True) for shape in ((B, D), (B, D), (B, k, D)))
    loss_fn = InfoNCELoss(0.05)
    dims, weights = (3, 16, 37), (1.0, 0.5, 2.0)
    got = matryoshka_loss(loss_fn, q, d, dims=dims, weights=weights, hard_negatives=h)
    want = sum(
        w * loss_fn(F.normalize(q[:, :m]), F.normalize(d[:, :m]), hard_negatives=F.normalize(h[..., :m], dim=-1))
        for m, w in zip(dims, weights)
    )
    g = torch.randn(())
    grads = torch.autograd.grad(got * g, (q, d, h))
    expected = torch.autograd.grad(want * g, (q, d, h))
    torch.testing.assert_close(got, want)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)
    # Without normalisation the prefixes are taken as they are.
    raw = matryoshka_loss(loss_fn, q, d, dims=(8,), normalize=False)
    torch.testing.assert_close(raw, loss_fn(q[:, :8], d[:, :8]))


@pytest.mark.parametrize(
    "dims, weights, message",
    [
        ((16, 8), (), "expected increasing dimensions"),
        ((8, 64), (), "at most the embedding dimension 37"),
        ((0, 8), (), "expected positive ints"),
        ((8, 16), (1.0,), "expected one per dim"),
        ((8, 16), (0.0, 0.0), "not all 0"),
        ((8, 16), (1.0, -1.0), "non-negative finite"),
    ],
)
def test_bad_dims_and_weights_are_named(dims, weights, message):
    q = torch.randn(3, 37)
    with pytest.raises(ValueError, match=message):
        matryoshka_loss(InfoNCELoss(), q, q, dims=dims, weights=weights)


def _tiny(rows):
    return tiny_model(train_tokenizer(vocabulary_texts(rows), vocab_size=512), max_length=48)


def test_encode_dim_truncates_and_renormalises():
    rows = _slice("retrieval", 12, 0)
    model = _tiny(rows)
    texts = [ex.query for ex in rows]
    full = model.encode(texts)
    torch.testing.assert_close(model.encode(texts, dim=16), F.normalize(full[:, :16]), rtol=0, atol=1e-6)
    assert torch.equal(model.encode(texts, dim=64), full)
    raw = model.encode(texts, normalize=False)
    assert torch.equal(model.encode(texts, dim=10, normalize=False), raw[:, :10])
    assert model.encode(texts[0], dim=8).shape == (8,)
    for bad in (0, 65, 2.0, True):
        with pytest.raises(ValueError, match=r"dim must be an int in \[1, 64\]"):
            model.encode(texts, dim=bad)


def test_train_matryoshka_full_dim_is_the_plain_loss_and_prefixes_train(tmp_path):
    torch.set_num_threads(1)
    data = _write_jsonl(tmp_path / "s1.jsonl", _slice("retrieval", 24, 1))
    common = dict(data=str(data), stage2_data="none", steps=3, batch_size=4, max_length=48, quiet=True, eval=False)
    plain = train(TrainConfig(**common))["loss_history"]
    one = train(TrainConfig(**common, matryoshka=(64,)))["loss_history"]
    assert [e["loss"] for e in one] == pytest.approx([e["loss"] for e in plain], rel=1e-6)
    out = tmp_path / "out"
    nested = train(TrainConfig(**common, matryoshka=(8, 32, 64), matryoshka_weights=(1, 1, 2), output=str(out)))
    first = nested["loss_history"][0]["loss"]
    # At step 1 the weights are the plain run's: the loss is the weighted sum of three losses,
    # each positive and the full one equal to the plain loss.
    assert first > 2 * plain[0]["loss"]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["matryoshka"] == [8, 32, 64] and saved["matryoshka_weights"] == [1, 1, 2]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--matryoshka", "64,16"], "expected increasing dimensions"),
        (["--matryoshka", "16,64", "--matryoshka-weights", "1"], "expected one per dim"),
        (["--matryoshka", "16,128"], "at most the embedding dimension 64"),
    ],
)
def test_cli_matryoshka_errors_name_the_flag(argv, message, capsys, tmp_path):
    data = _write_jsonl(tmp_path / "s1.jsonl", _slice("retrieval", 16, 2))
    code = cli_main(["--data", str(data), "--stage2-data", "none", "--steps", "1", "--batch-size", "4", *argv])
    err = capsys.readouterr().err
    assert code != 0 and "--matryoshka" in err and message in err, err
