"""Multi-LoRA on the project's DecoderModel: padded, internally unpadded and packed layouts agree."""

import pytest
import torch

from latentembed.modules.lora import apply_multi_lora, lora_routing, multi_lora_layers

from .multi_lora_helpers import ADAPTERS, randomize

decoder = pytest.importorskip("latentembed.models.decoder", reason="the decoder backbone is not available")
config = pytest.importorskip("latentembed.models.decoder_config")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def model():
    cfg = config.DecoderConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    m = decoder.DecoderModel(cfg).eval()
    apply_multi_lora(m, TARGETS, ADAPTERS, rank=[8, 4, 2, 6], alpha=8, r_max=8)
    for _, layer in multi_lora_layers(m):
        randomize(layer)
    return m


def test_padded_unpadded_and_packed_routing_agree(model):
    lengths = torch.tensor([5, 2, 7])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    ids = torch.randint(0, 97, (3, 7))
    tasks = ["classification", "base", "retrieval.passage"]
    cu = torch.tensor([0, 5, 7, 14], dtype=torch.int32)
    with torch.no_grad():
        with lora_routing(model, tasks, attention_mask=mask):
            padded = model(ids, mask, unpad=False).last_hidden_state
            unpadded = model(ids, mask, unpad=True).last_hidden_state
        with lora_routing(model, tasks, cu_seqlens=cu):
            packed = model(ids[mask], cu_seqlens=cu).last_hidden_state
        with lora_routing(model, ["base"] * 3, attention_mask=mask):
            base = model(ids, mask, unpad=False).last_hidden_state
    torch.testing.assert_close(unpadded[mask], padded[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed, padded[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded[1], base[1], rtol=1e-5, atol=1e-5)  # "base" sample untouched
    assert not torch.allclose(padded[0, :5], base[0, :5], atol=1e-3)


def test_gradient_checkpointing_recomputes_with_the_forward_routing(model):
    """Checkpointed layers re-run their forward during backward, after lora_routing has exited."""
    ids = torch.randint(0, 97, (3, 6))
    tasks = ["text-matching", "retrieval.query", "base"]
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing_enable(checkpointing)
        with lora_routing(model, tasks):
            out = model(ids).last_hidden_state
        grads.append(torch.autograd.grad(out.square().sum(), params))
    for g, g_ckpt in zip(*grads):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads[0])


def _routed_outputs(model, ids, mask, tasks, **kw):
    """The natural call: per-sample tasks only, whatever the decoder does with the layout."""
    with torch.no_grad(), lora_routing(model, tasks):
        return model(ids, mask, **kw).last_hidden_state


def test_per_sample_tasks_alone_route_unpadded_and_packed_calls(model):
    """The decoder reports its row order (sequence_layout): no cu_seqlens / attention_mask needed."""
    lengths = torch.tensor([5, 2, 7, 1])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    ids = torch.randint(0, 97, (4, 7))
    tasks = ["classification", "base", "retrieval.passage", "text-matching"]
    cu = torch.zeros(5, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    padded = _routed_outputs(model, ids, mask, tasks, unpad=False)
    unpadded = _routed_outputs(model, ids, mask, tasks, unpad=True)
    with torch.no_grad(), lora_routing(model, tasks):
        packed = model(ids[mask], cu_seqlens=cu).last_hidden_state
    torch.testing.assert_close(unpadded, padded, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed, padded[mask], rtol=1e-4, atol=1e-4)
    for b, task in enumerate(tasks):  # each sample equals itself run alone with its adapter
        n = int(lengths[b])
        alone = _routed_outputs(model, ids[b : b + 1, :n], None, [task], unpad=True)
        torch.testing.assert_close(unpadded[b, :n], alone[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="given 3 per-sample tasks, but the model's input holds 4 sequences"):
        _routed_outputs(model, ids, mask, tasks[:3], unpad=True)


def test_checkpoint_recompute_uses_each_forwards_own_routing(model):
    """A contrastive step: query and passage forwards under different routings plus one under
    the default adapter, one backward. Recomputed layers must not take the latest routing."""
    model.layers[0].self_attn.q_proj.routing.default_adapter = "classification"
    lengths = torch.tensor([6, 3, 4])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    q_ids, p_ids, d_ids = (torch.randint(0, 97, (3, 6)) for _ in range(3))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing_enable(checkpointing)
        with lora_routing(model, ["retrieval.query"] * 3):
            q = model(q_ids, mask, unpad=True).last_hidden_state
        with lora_routing(model, ["retrieval.passage", "base", "text-matching"]):
            p = model(p_ids, mask, unpad=False).last_hidden_state
        d = model(d_ids, mask).last_hidden_state  # no routing: the default adapter
        loss = (q * p).sum() + (p * d).sum() + q.square().sum()
        grads.append(torch.autograd.grad(loss, params))
    for g, g_ckpt in zip(*grads):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-5, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in grads[0])


@pytest.mark.gpu
def test_bf16_padded_call_with_auto_unpad_on_gpu(model):
    """On a GPU in bf16 unpad='auto' packs internally (varlen): the natural per-sample call must
    route it, and agree with the padded run and with each sample alone."""
    from latentembed.modules.attention import packed_backend_available

    if packed_backend_available(torch.device("cuda"), torch.bfloat16) is None:
        pytest.skip("no packed attention backend (varlen / flash) on this GPU: auto does not unpad")
    model = model.cuda().to(torch.bfloat16)
    lengths = torch.tensor([57, 3, 128, 1, 90])
    mask = (torch.arange(128)[None, :] < lengths[:, None]).cuda()
    ids = torch.randint(0, 97, (5, 128), device="cuda")
    tasks = ["classification", "base", "retrieval.passage", "text-matching", "retrieval.query"]
    auto = _routed_outputs(model, ids, mask, tasks)  # unpad="auto"
    padded = _routed_outputs(model, ids, mask, tasks, unpad=False)
    torch.testing.assert_close(auto[mask].float(), padded[mask].float(), rtol=5e-2, atol=5e-2)
    for b, task in enumerate(tasks):
        n = int(lengths[b])
        alone = _routed_outputs(model, ids[b : b + 1, :n], None, [task], unpad=False)
        torch.testing.assert_close(auto[b, :n].float(), alone[0].float(), rtol=5e-2, atol=5e-2)
