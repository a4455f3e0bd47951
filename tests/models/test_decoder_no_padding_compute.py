"""No compute on padding on CPU: padded input is unpadded by default (``unpad="auto"``) and runs
packed (one SDPA call per sequence), every linear sees the real rows only, and the result and
its gradients equal the padded computation to fp32 rounding."""

import pytest
import torch

from latentembed.models.decoder import DecoderModel
from latentembed.models.decoder_config import DecoderConfig
from latentembed.models.embedding import EmbeddingModel
from latentembed.models.embedding_config import EmbeddingConfig
from latentembed.tokenization import pack_sequences

from .decoder_helpers import TINY, random_batch

LENGTHS = [9, 1, 4, 7, 3]


def tiny() -> DecoderModel:
    return DecoderModel(DecoderConfig(**TINY))


def _rows_seen(model, call) -> list:
    seen = []
    handle = model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        call()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("backend, rows", [("auto", "real"), ("sdpa", "real"), ("math", "padded")])
def test_padded_input_runs_on_real_rows_only(backend, rows):
    model = tiny()
    ids, mask = random_batch(LENGTHS)
    seen = _rows_seen(model, lambda: model(ids, mask, attn_backend=backend))
    want = (sum(LENGTHS), 64) if rows == "real" else (len(LENGTHS), max(LENGTHS), 64)
    assert [tuple(s) for s in seen] == [want]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_unpadded_default_equals_padded_with_gradients(causal):
    torch.manual_seed(0)
    model = tiny().train()
    ids, mask = random_batch(LENGTHS)
    grad = torch.randn(len(LENGTHS), max(LENGTHS), 64)

    def run(unpad):
        model.zero_grad()
        out = model(ids, mask, causal=causal, unpad=unpad).last_hidden_state
        out.backward(grad)
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    lean, lean_grads = run("auto")
    padded, padded_grads = run(False)
    torch.testing.assert_close(lean, padded, rtol=1e-5, atol=1e-5)
    assert (lean[~mask] == 0).all()
    for name, g in padded_grads.items():
        torch.testing.assert_close(lean_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_embedding_batch_inputs_pack_on_cpu():
    model = EmbeddingModel(tiny().config, EmbeddingConfig(pooling="mean"))
    batch = pack_sequences([[5, 6, 7], [8], [9, 10]], [[1, 1, 1], [1], [1, 1]])
    args, kwargs = model.batch_inputs(batch)
    assert args[0].shape == (6,) and torch.equal(kwargs["cu_seqlens"], batch.cu_seqlens)
    padded_args, padded_kwargs = model.batch_inputs(batch, packed=False)
    assert padded_args[0].shape == (3, 3) and "cu_seqlens" not in padded_kwargs
    with torch.no_grad():
        torch.testing.assert_close(model(*args, **kwargs), model(*padded_args, **padded_kwargs), rtol=1e-5, atol=1e-6)
    model_math = EmbeddingModel(tiny().config, EmbeddingConfig(pooling="mean"), attn_backend="math")
    math_args, _ = model_math.batch_inputs(batch)
    assert math_args[0].shape == (3, 3)  # math's packed mask is [T, T]: padded is the lean choice
