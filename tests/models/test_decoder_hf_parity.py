"""latentembed's decoder against transformers' MistralModel / LlamaModel / Qwen2Model (fp32, CPU).

The transformers model is built with random weights, saved as safetensors by save_pretrained and
loaded by latentembed from disk, so these tests also cover checkpoint loading.
"""

import pytest
import torch

from latentembed.models.checkpoint import load_decoder

from .decoder_helpers import (
    FAMILIES,
    bidirectional_mask_4d,
    hf_model,
    hf_positions,
    pack,
    random_batch,
    rel_err,
    save_hf,
)

transformers = pytest.importorskip("transformers")

LENGTHS = [7, 3, 1, 6]


def _pair(family, tmp_path, **overrides):
    hf = hf_model(family, **overrides)
    save_hf(hf, tmp_path)
    return hf, load_decoder(tmp_path)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_causal_matches_transformers(family, tmp_path, left, backend):
    hf, ours = _pair(family, tmp_path)
    ids, mask = random_batch(LENGTHS, left=left)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask.long(), position_ids=hf_positions(mask), output_hidden_states=True)
        out = ours(ids, mask, causal=True, attn_backend=backend, output_hidden_states=True)
    assert rel_err(out.last_hidden_state[mask], ref.last_hidden_state[mask]) <= 1e-5
    # transformers' hidden_states: embeddings, layer outputs..., and the final *normed* output.
    for i in range(len(ours.layers)):
        assert rel_err(out.hidden_states[i][mask], ref.hidden_states[i][mask]) <= 1e-5
    assert len(out.hidden_states) == len(ours.layers) + 1
    assert (out.last_hidden_state[~mask] == 0).all()


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_bidirectional_matches_transformers_4d_mask(family, tmp_path, left):
    hf, ours = _pair(family, tmp_path)
    ids, mask = random_batch(LENGTHS, left=left)
    with torch.no_grad():
        ref = hf(ids, attention_mask=bidirectional_mask_4d(mask), position_ids=hf_positions(mask))
        out = ours(ids, mask)  # causal=False is the default
        causal = ours(ids, mask, causal=True)
    assert rel_err(out.last_hidden_state[mask], ref.last_hidden_state[mask]) <= 1e-5
    # the test can fail: bidirectional differs from causal on every sequence longer than 1
    assert rel_err(causal.last_hidden_state[mask], ref.last_hidden_state[mask]) > 1e-3


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_packed_matches_transformers(family, tmp_path, causal):
    hf, ours = _pair(family, tmp_path)
    ids, mask = random_batch(LENGTHS)
    packed_ids, cu = pack(ids, mask)
    hf_mask = mask.long() if causal else bidirectional_mask_4d(mask)
    with torch.no_grad():
        ref = hf(ids, attention_mask=hf_mask, position_ids=hf_positions(mask)).last_hidden_state[mask]
        out = ours(packed_ids, cu_seqlens=cu, causal=causal, attn_backend="math").last_hidden_state
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_gradients_match_transformers(family, tmp_path, causal):
    hf, ours = _pair(family, tmp_path)
    ids, mask = random_batch([5, 2, 4])
    embeds = hf.embed_tokens(ids).detach()
    grad_out = torch.randn(*ids.shape, 64) * mask[..., None]  # padding outputs differ by design
    hf_mask = mask.long() if causal else bidirectional_mask_4d(mask)

    x_hf = embeds.clone().requires_grad_()
    ref = hf(inputs_embeds=x_hf, attention_mask=hf_mask, position_ids=hf_positions(mask)).last_hidden_state
    ref.backward(grad_out)
    x = embeds.clone().requires_grad_()
    ours(inputs_embeds=x, attention_mask=mask, causal=causal).last_hidden_state.backward(grad_out)

    assert rel_err(x.grad, x_hf.grad) <= 1e-5
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        if name == "embed_tokens.weight":
            continue  # inputs_embeds bypasses the table in both models
        assert rel_err(p.grad, hf_grads[name].grad) <= 1e-5, name


def test_token_gradient_through_embedding_table(family, tmp_path):
    hf, ours = _pair(family, tmp_path)
    ids, mask = random_batch([4, 6])
    grad_out = torch.randn(*ids.shape, 64) * mask[..., None]
    hf(ids, attention_mask=mask.long(), position_ids=hf_positions(mask)).last_hidden_state.backward(grad_out)
    ours(ids, mask, causal=True).last_hidden_state.backward(grad_out)
    assert rel_err(ours.embed_tokens.weight.grad, hf.embed_tokens.weight.grad) <= 1e-5


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    }
    hf, ours = _pair("llama", tmp_path, rope_parameters=rope)
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    ids, mask = random_batch([21, 13])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask.long(), position_ids=hf_positions(mask)).last_hidden_state
        out = ours(ids, mask, causal=True).last_hidden_state
    assert rel_err(out[mask], ref[mask]) <= 1e-5
    # the scaling matters at these positions: without it the result differs
    ours.rotary_emb.scaling = None
    ours.reset_buffers()
    with torch.no_grad():
        unscaled = ours(ids, mask, causal=True).last_hidden_state
    assert rel_err(unscaled[mask], ref[mask]) > 1e-3


def test_qwen2_projection_biases_loaded(tmp_path):
    hf, ours = _pair("qwen2", tmp_path)
    attn = ours.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None
    torch.testing.assert_close(attn.q_proj.bias, hf.layers[0].self_attn.q_proj.bias, rtol=0, atol=0)
