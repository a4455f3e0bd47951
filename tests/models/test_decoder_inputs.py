"""Padded / packed / left / right inputs, attention backends, numerics and training features of
the decoder (tiny random models, CPU; GPU-only backends are marked ``gpu``)."""

import pytest
import torch
from torch import nn

from latentembed.models.decoder import DecoderModel
from latentembed.models.decoder_config import DecoderConfig
from latentembed.modules.attention import (
    AttentionInputs,
    dense_packed_mask,
    dense_padding_mask,
    select_attention_backend,
)
from latentembed.ops.dispatch import BackendUnavailableError
from tests.tolerances import assert_within_budget

from .decoder_helpers import FAMILIES, pack, random_batch, rel_err

LENGTHS = [9, 1, 4, 7, 3]


def tiny(family="mistral", **overrides) -> DecoderModel:
    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        model_type=family,
        qkv_bias=family == "qwen2",
    )
    kwargs.update(overrides)
    model = DecoderModel(DecoderConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_padded_packed_unpadded_left_right_agree(family, causal, backend):
    model = tiny(family)
    ids, mask = random_batch(LENGTHS)
    packed_ids, cu = pack(ids, mask)
    left_ids = torch.zeros_like(ids)
    left_mask = torch.zeros_like(mask)
    for b, n in enumerate(LENGTHS):  # the same tokens, moved to the right end
        left_ids[b, ids.shape[1] - n :] = ids[b, :n]
        left_mask[b, ids.shape[1] - n :] = True
    kw = dict(causal=causal, attn_backend=backend)
    with torch.no_grad():
        packed = model(packed_ids, cu_seqlens=cu, **kw).last_hidden_state
        right = model(ids, mask, unpad=False, **kw).last_hidden_state
        left = model(left_ids, left_mask, unpad=False, **kw).last_hidden_state
        unpadded = model(ids, mask, unpad=True, **kw).last_hidden_state
    assert packed.shape == (sum(LENGTHS), 64)
    assert rel_err(right[mask], packed) <= 1e-5
    assert rel_err(left[left_mask], packed) <= 1e-5
    assert rel_err(unpadded[mask], packed) <= 1e-5
    for out, m in ((right, mask), (left, left_mask), (unpadded, mask)):
        assert (out[~m] == 0).all()


def test_packed_sequences_are_independent():
    """Changing one packed sequence must not change another's output."""
    model = tiny()
    ids, mask = random_batch([5, 6])
    packed_ids, cu = pack(ids, mask)
    other = packed_ids.clone()
    other[:5] = torch.randint(0, 128, (5,))
    with torch.no_grad():
        a = model(packed_ids, cu_seqlens=cu).last_hidden_state
        b = model(other, cu_seqlens=cu).last_hidden_state
    torch.testing.assert_close(a[5:], b[5:], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a[:5], b[:5])


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_padding_never_makes_nan(causal):
    """Left padding under a causal mask and an all-padding row leave no query without keys."""
    model = tiny()
    ids, mask = random_batch([4, 6], left=True)
    mask[0] = False  # a row with no real token at all
    x = model.embed_tokens(ids).detach().requires_grad_()
    out = model(inputs_embeds=x, attention_mask=mask, causal=causal, unpad=False).last_hidden_state
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert (x.grad[~mask] == 0).all()  # padding inputs influence no real output


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_float64_gradcheck(layout):
    model = tiny(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    ).double()
    ids, mask = random_batch([3, 2])
    x = model.embed_tokens(ids).detach()
    if layout == "packed":
        _, cu = pack(ids, mask)
        x = x[mask].clone().requires_grad_()
        fn = lambda t: model(inputs_embeds=t, cu_seqlens=cu, attn_backend="math").last_hidden_state  # noqa: E731
    else:
        x = x.clone().requires_grad_()
        fn = lambda t: model(inputs_embeds=t, attention_mask=mask, attn_backend="math").last_hidden_state  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_bf16_autocast_within_budget():
    """Under bf16 autocast the error vs float64 is at most twice that of transformers' own
    bf16-autocast forward of the same weights."""
    pytest.importorskip("transformers")
    from .decoder_helpers import bidirectional_mask_4d, hf_model, hf_positions

    hf = hf_model("mistral")
    model = tiny()
    model.load_state_dict(hf.state_dict(), strict=False)
    ids, mask = random_batch([8, 5])
    with torch.no_grad():
        exact = model.double()(ids, mask, attn_backend="math").last_hidden_state
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = model(ids, mask).last_hidden_state
            ref = hf(ids, attention_mask=bidirectional_mask_4d(mask), position_ids=hf_positions(mask)).last_hidden_state
    assert_within_budget("autocast bf16", ours[mask].float(), ref[mask].float(), exact[mask])


def test_gradient_checkpointing_same_gradients():
    model = tiny().train()
    ids, mask = random_batch([6, 3])
    grad_out = torch.randn(2, 6, 64)

    def grads():
        model.zero_grad()
        model(ids, mask).last_hidden_state.backward(grad_out)
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    ckpt = grads()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["padded-sdpa", "packed-math"])
def test_compiled_layer_has_no_graph_break(layout):
    model = tiny("qwen2")
    layer = model.layers[0]
    ids, mask = random_batch([5, 3])
    if layout.startswith("packed"):
        _, cu = pack(ids, mask)
        x = torch.randn(int(mask.sum()), 64)
        inputs = AttentionInputs("math", False, dense_mask=dense_packed_mask(cu, x.shape[0], False), cu_seqlens=cu)
        positions = torch.cat([torch.arange(n) for n in (5, 3)])
    else:
        x = torch.randn(2, 5, 64)
        inputs = AttentionInputs("sdpa", True, dense_mask=dense_padding_mask(mask, True))
        positions = torch.arange(5).expand(2, 5)
    cos, sin = model.rotary_emb(positions, x.dtype)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = compiled(x1, cos, sin, inputs), layer(x2, cos, sin, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)


class LowRankWrapper(nn.Module):
    """What an adapter does: wrap a projection, same call signature [..., in] -> [..., out]."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def test_projections_are_replaceable_by_name():
    model = tiny("qwen2")
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    targets = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names]
    assert len(targets) == 7 * 2 and all(isinstance(m, nn.Linear) for _, m in targets)
    ids, mask = random_batch([4, 2])
    _, cu = pack(ids, mask)
    with torch.no_grad():
        before = model(ids, mask).last_hidden_state
    for name, module in targets:
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, LowRankWrapper(module))
    out = model(ids[mask], cu_seqlens=cu).last_hidden_state
    out.sum().backward()
    assert not torch.allclose(out, before[mask])
    assert model.layers[1].mlp.down_proj.up.weight.grad is not None


def test_backend_selection_and_errors():
    cpu = torch.device("cpu")
    assert select_attention_backend("auto", cpu, torch.float32, packed=True) == "sdpa"
    assert select_attention_backend("math", cpu, torch.bfloat16, packed=False) == "math"
    with pytest.raises(BackendUnavailableError, match="varlen: runs on \\['cuda'\\]"):
        select_attention_backend("varlen", cpu, torch.bfloat16, packed=True)
    with pytest.raises(ValueError, match="attention backend must be"):
        select_attention_backend("xformers", cpu, torch.float32, packed=True)
    model = tiny()
    ids, mask = random_batch([3, 2])
    with pytest.raises(BackendUnavailableError, match="flash"):
        model(ids, mask, attn_backend="flash")


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    ids, mask = random_batch([3, 2])
    packed_ids, cu = pack(ids, mask)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, L\] = \(2, 3\)"):
        model(ids, mask[:, :2])
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        model(ids, mask.float())
    with pytest.raises(ValueError, match="input_ids must have 2 dims"):
        model(ids[None])
    with pytest.raises(TypeError, match="cu_seqlens must have dtype int32"):
        model(packed_ids, cu_seqlens=cu.long())
    with pytest.raises(ValueError, match="cu_seqlens must end at"):
        model(packed_ids[:-1], cu_seqlens=cu)
    with pytest.raises(ValueError, match="not both"):
        model(packed_ids, mask, cu_seqlens=cu)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()


def test_config_rejects_bad_values():
    base = dict(vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match="model_type must be one of"):
        DecoderConfig(**base, model_type="gemma")
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        DecoderConfig(**base, num_key_value_heads=3)
    with pytest.raises(ValueError, match="rope_type must be one of"):
        DecoderConfig(**base, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    old_style = dict(
        base,
        model_type="llama",
        rope_theta=5e5,
        rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    )
    cfg = DecoderConfig.from_hf_config(old_style)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["original_max_position_embeddings"] == 32768


def test_config_copies_the_callers_rope_scaling():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    given = dict(scaling)
    cfg = DecoderConfig(
        vocab_size=8,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        model_type="llama",
        rope_scaling=given,
        max_position_embeddings=64,
    )
    assert given == scaling
    assert cfg.rope_scaling == dict(scaling, original_max_position_embeddings=64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_cast_model_keeps_fp32_rotary_frequencies(dtype):
    """model.to(bf16) must not round inv_freq: bf16 frequencies give angle errors of ~0.1 rad
    at positions < 512. The angles stay those of an fp32 module, fp32-accurate vs float64."""
    from latentembed.modules.rotary import RotaryEmbedding

    model = tiny()
    model.to(dtype)
    assert model.embed_tokens.weight.dtype == dtype
    rope = model.rotary_emb
    assert rope.inv_freq.dtype == torch.float32
    positions = torch.arange(0, 8192, 3)
    cos, sin = rope(positions, torch.float32)
    ref_cos, ref_sin = RotaryEmbedding(rope.head_dim, rope.theta)(positions, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    half = rope.head_dim // 2
    exact = positions.double()[:, None] / rope.theta ** (torch.arange(0, rope.head_dim, 2).double() / rope.head_dim)
    assert (cos[:, :half].double() - exact.cos()).abs().max() < 2e-3
    assert (sin[:, :half].double() - exact.sin()).abs().max() < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["varlen", "flash", "sdpa"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_gpu_backends_bf16_within_budget(backend, causal):
    """Forward and input gradient of each GPU backend in bf16, packed and padded, against the
    math reference in bf16 and in float64 (error-budget rule)."""
    from latentembed.modules.attention import _BACKENDS

    spec = next(b for b in _BACKENDS if b.name == backend)
    reason = spec.why_not(torch.device("cuda"), torch.bfloat16, True)
    if reason:
        pytest.skip(reason)
    model = tiny(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=320).cuda()
    ids, mask = random_batch([127, 1, 64, 3, 100])
    packed_ids, cu = pack(ids, mask)
    ids, mask, packed_ids, cu = ids.cuda(), mask.cuda(), packed_ids.cuda(), cu.cuda()
    x = model.embed_tokens(packed_ids).detach()
    grad_out = torch.randn(x.shape[0], 256, device="cuda")

    def run(dtype, name, padded=False):
        model.to(dtype)
        xs = x.to(dtype).requires_grad_()
        if padded:
            full = torch.zeros(*mask.shape, 256, device="cuda", dtype=dtype).masked_scatter(mask[..., None], xs)
            out = model(inputs_embeds=full, attention_mask=mask, causal=causal, attn_backend=name).last_hidden_state[
                mask
            ]
        else:
            out = model(inputs_embeds=xs, cu_seqlens=cu, causal=causal, attn_backend=name).last_hidden_state
        out.backward(grad_out.to(dtype))
        model.zero_grad()
        return out.detach(), xs.grad

    exact, exact_grad = run(torch.float64, "math")
    ref, ref_grad = run(torch.bfloat16, "math")
    for padded in (False, True):
        out, grad = run(torch.bfloat16, backend, padded)
        layout = "padded" if padded else "packed"
        assert_within_budget(f"{backend} {layout} forward", out, ref, exact)
        assert_within_budget(f"{backend} {layout} grad", grad, ref_grad, exact_grad)
