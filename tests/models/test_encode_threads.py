"""EmbeddingModel from several threads at once: encode() and routed forwards stay correct and
leave the module's training mode as it was."""

import copy
import pickle
import threading

import pytest
import torch

from tests.tokenizer_helpers import VOCAB_SIZE

from .decoder_helpers import rel_err
from .test_embedding_model import TEXTS, tiny_model

pytest.importorskip("transformers")

TASKS = ("query", "passage", None)  # None: the base weights of a multi-adapter model


def run_in_threads(work, rounds: int) -> list:
    """Run ``work(thread_index)`` in len(TASKS) threads released together, ``rounds`` times;
    returns, per round, the results in thread order (an exception counts as a result)."""
    barrier = threading.Barrier(len(TASKS))
    results = []
    for _ in range(rounds):
        out = [None] * len(TASKS)

        def target(i, out=out):
            barrier.wait()
            try:
                out[i] = work(i)
            except Exception as e:  # noqa: BLE001 - a wrong answer and a crash both fail below
                out[i] = e

        threads = [threading.Thread(target=target, args=(i,)) for i in range(len(TASKS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results.append(out)
    return results


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_concurrent_encode_with_different_adapters_is_correct_and_keeps_the_mode(mode):
    model = tiny_model("mean", adapters=["query", "passage"]).train(mode == "train")
    texts = TEXTS * 2
    expected = [model.encode(texts, task=task, batch_size=2) for task in TASKS]
    # the adapters really differ, so a result computed with another thread's routing is caught
    assert min(rel_err(expected[i], expected[j]) for i in range(3) for j in range(i)) > 1e-3
    for out in run_in_threads(lambda i: model.encode(texts, task=TASKS[i], batch_size=2), rounds=6):
        assert model.training == (mode == "train")
        for i, got in enumerate(out):
            assert not isinstance(got, Exception), f"thread {TASKS[i]!r} raised {got!r}"
            assert rel_err(got, expected[i]) <= 1e-5, f"thread {TASKS[i]!r} got another adapter's result"


@pytest.mark.parametrize("pooling", ["mean", "latent_attention"])  # latent: its fold cache is shared too
def test_concurrent_routed_forwards_are_correct(pooling):
    model = tiny_model(pooling, adapters=["query", "passage"])
    ids, mask = torch.randint(0, VOCAB_SIZE, (5, 11)), torch.ones(5, 11, dtype=torch.bool)
    mask[1, 4:] = False
    tasks = [task or "base" for task in TASKS]
    with torch.no_grad():
        expected = [model(ids, mask, tasks=task) for task in tasks]
        results = run_in_threads(lambda i: [model(ids, mask, tasks=tasks[i]) for _ in range(4)], rounds=4)
    for out in results:
        for i, got in enumerate(out):
            assert not isinstance(got, Exception), f"thread {tasks[i]!r} raised {got!r}"
            assert max(rel_err(g, expected[i]) for g in got) <= 1e-5, f"thread {tasks[i]!r}: wrong adapter"


def test_model_still_copies_and_pickles_after_threaded_encode():
    # The encode lock and the per-thread routing must not make the model uncopyable.
    model = tiny_model("mean", adapters=["query", "passage"])
    expected = model.encode(TEXTS, task="query")
    run_in_threads(lambda i: model.encode(TEXTS, task=TASKS[i]), rounds=1)
    clones = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    for clone in clones:
        assert clone.template == model.template
        got = run_in_threads(lambda i, clone=clone: clone.encode(TEXTS, task=TASKS[i]), rounds=1)[0]
        assert rel_err(got[0], expected) <= 1e-6


def test_checkpointed_backward_on_another_thread_recomputes_with_each_forwards_routing():
    # On CUDA autograd runs the backward on its own threads, where the per-thread routing of the
    # forward is not set: checkpoint recomputes must still get the routing of their forward.
    model = tiny_model("mean", adapters=["query", "passage"]).train()
    q_ids, p_ids = torch.randint(0, VOCAB_SIZE, (3, 8)), torch.randint(0, VOCAB_SIZE, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[2, 5:] = False
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    grads = {}
    for checkpointing in (False, True):
        model.backbone.gradient_checkpointing_enable(checkpointing)
        q = model(q_ids, mask, tasks="query")
        p = model(p_ids, mask, tasks=["passage", "base", "query"])
        loss = (q * p).sum() + q.square().sum()
        out = run_in_threads(
            lambda i, loss=loss: torch.autograd.grad(loss, params, retain_graph=True) if i == 0 else None, rounds=1
        )[0][0]
        assert not isinstance(out, Exception), out
        grads[checkpointing] = out
    for g, g_ckpt in zip(grads[False], grads[True]):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads[False])
