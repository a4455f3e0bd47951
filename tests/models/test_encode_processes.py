"""Multi-process encode: ``encode(..., devices=["cpu", "cpu"])`` and an open :class:`EncodePool`
return one process's embeddings, in input order; a worker's error reaches the caller; bad
devices fail naming the argument. Two spawned CPU workers (each imports torch: seconds)."""

import pytest
import torch

from latentembed.models.encode_pool import EncodePool
from latentembed.training.tiny import tiny_model, train_tokenizer, vocabulary_texts
from tests.test_training_run import _slice


@pytest.fixture(scope="module")
def model_and_texts():
    rows = _slice("retrieval", 20, 11)
    torch.manual_seed(11)
    model = tiny_model(train_tokenizer(vocabulary_texts(rows), vocab_size=512), max_length=128)
    texts = [t for ex in rows for t in (ex.query, ex.positive)]  # 40 texts, lengths 4 to ~40 tokens
    return model, texts


def _check_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.device.type == "cpu"
    # Equal up to the rounding of other batch compositions (a worker batches its own chunk) ...
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    # ... and in input order: every row is nearest to its own single-process row.
    assert torch.equal((got @ want.T).argmax(1), torch.arange(len(want)))


def test_encode_with_two_cpu_processes_equals_one_process(model_and_texts):
    model, texts = model_and_texts
    want = model.encode(texts, batch_size=4, task="retrieval")
    got = model.encode(texts, batch_size=4, task="retrieval", devices=["cpu", "cpu"])
    _check_same(got, want)
    assert next(model.parameters()).device.type == "cpu"


def test_an_open_pool_serves_several_calls_and_reports_errors(model_and_texts):
    model, texts = model_and_texts
    with EncodePool(model, ["cpu", "cpu"], threads=1) as pool:
        _check_same(pool.encode(texts, chunk_size=3), model.encode(texts))
        _check_same(pool.encode(texts[:7], dim=16, batch_size=2), model.encode(texts[:7], dim=16))
        assert pool.encode([]).shape == (0, 64)
        with pytest.raises(RuntimeError, match="unknown task 'no-such-task'"):
            pool.encode(texts[:3], task="no-such-task")
        _check_same(pool.encode(texts[:5]), model.encode(texts[:5]))  # still serving after an error


@pytest.mark.parametrize(
    "devices, message",
    [([], "devices: expected a non-empty list"), (["gpu0"], "devices: 'gpu0' is not a device")],
)
def test_bad_devices_are_named(model_and_texts, devices, message):
    model, texts = model_and_texts
    with pytest.raises(ValueError, match=message):
        model.encode(texts, devices=devices)
