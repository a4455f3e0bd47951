"""apply_multi_lora on a plain nn.Module and on tiny transformers Llama / Mistral models; bad input."""

import copy

import pytest
import torch
from torch import nn

from latentembed.modules.lora import MultiLoRALinear, apply_multi_lora, lora_routing, multi_lora_layers
from tests.tolerances import assert_within_budget

from .multi_lora_helpers import ADAPTERS, random_layer, randomize

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TinyBlock(nn.Module):
    """The backbone's attribute names on plain Linears (attention-free, enough for routing)."""

    def __init__(self, d=24):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, 40), nn.Linear(d, 40), nn.Linear(40, d)
        self.head = nn.Linear(d, 5)  # not a target: stays an nn.Linear

    def forward(self, x):
        h = x + self.o_proj(self.q_proj(x) * torch.sigmoid(self.k_proj(x)) + self.v_proj(x))
        h = h + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
        return self.head(h)


def _randomize_all(model):
    for _, layer in multi_lora_layers(model):
        randomize(layer)


def _per_sample_by_merging(model, x_list, tasks, call):
    """Each sample alone through a copy with its adapter merged into every layer (or none)."""
    outs = []
    for x, task in zip(x_list, tasks):
        merged = copy.deepcopy(model)
        for _, layer in multi_lora_layers(merged):
            if task != "base":
                layer.merge(task)
            else:
                layer.routing.default_adapter = -1
        outs.append(call(merged, x))
    return outs


def test_plain_module_mixed_batch_matches_merged_per_sample():
    model = TinyBlock()
    routing = apply_multi_lora(
        model,
        TARGETS,
        ADAPTERS,
        rank={"retrieval.query": 4, "retrieval.passage": 2, "classification": 6, "text-matching": 1},
        alpha=4.0,
    )
    assert sorted(n for n, _ in multi_lora_layers(model)) == sorted(TARGETS)
    assert isinstance(model.head, nn.Linear) and all(m.routing is routing for _, m in multi_lora_layers(model))
    _randomize_all(model)
    tasks = ["classification", "base", "retrieval.query", "text-matching", "retrieval.passage"]
    x = torch.randn(5, 3, 24)
    with lora_routing(model, tasks):
        mixed = model(x)
    alone = torch.stack(_per_sample_by_merging(model, x.unbind(0), tasks, lambda m, xi: m(xi[None])[0]))
    exact = torch.stack(
        _per_sample_by_merging(copy.deepcopy(model).double(), x.double().unbind(0), tasks, lambda m, xi: m(xi[None])[0])
    )
    # routed (x W^T + s (x A^T) B^T) and merged (x (W + s B A)^T) round differently: budget
    # against float64, not a fixed tolerance
    assert_within_budget("mixed batch", mixed, alone, exact)


def test_only_lora_weights_train_in_wrapped_layers():
    model = TinyBlock()
    apply_multi_lora(model, TARGETS, ADAPTERS, rank=2, alpha=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.lora_{w}" for t in TARGETS for w in "ab"} | {"head.weight", "head.bias"}


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_transformers_decoder_mixed_batch(arch):
    transformers = pytest.importorskip("transformers")
    kw = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=64,
    )
    if arch == "llama":
        model = transformers.LlamaModel(transformers.LlamaConfig(**kw))
    else:
        model = transformers.MistralModel(transformers.MistralConfig(**kw, sliding_window=None))
    model.eval()
    apply_multi_lora(model, TARGETS, ADAPTERS, rank=[8, 4, 2, 5], alpha=[16, 4, 2, 5], r_max=8)
    assert len(list(multi_lora_layers(model))) == 2 * len(TARGETS)
    _randomize_all(model)
    ids = torch.randint(0, 101, (4, 6))
    tasks = ["text-matching", "retrieval.query", "base", "retrieval.passage"]
    with torch.no_grad():
        with lora_routing(model, tasks):
            mixed = model(input_ids=ids).last_hidden_state
        alone = _per_sample_by_merging(
            model, ids.unbind(0), tasks, lambda m, i: m(input_ids=i[None]).last_hidden_state[0]
        )
        with lora_routing(model, ["base"] * 4):
            base = model(input_ids=ids).last_hidden_state
    for i, ref in enumerate(alone):
        torch.testing.assert_close(mixed[i], ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(mixed[2], base[2]) and not torch.allclose(mixed[0], base[0], atol=1e-3)


def test_bad_input_raises_clear_errors():
    layer = random_layer()
    x = torch.randn(3, 4, 37)
    with pytest.raises(KeyError, match="unknown adapter name 'retrieval.qeury'"):
        with lora_routing(layer, ["retrieval.qeury", 0, 1]):
            pass
    with pytest.raises(IndexError, match=r"adapter id 4 out of range \[-1, 4\)"):
        with lora_routing(layer, [0, 4, 1]):
            pass
    with pytest.raises(IndexError, match="min -2"):
        layer(x, adapter_index=torch.tensor([0, -2, 1]))
    with pytest.raises(TypeError, match="integer dtype"):
        layer(x, adapter_index=torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"input must have shape \[\.\.\., 37\], got \(3, 4, 36\)"):
        layer(torch.randn(3, 4, 36), adapter_index=torch.tensor([0, 1, 2]))
    with pytest.raises(
        ValueError,
        match=r"leading shape \(3, 4\) \(12 rows\) does not fit the routing: expected "
        r"leading dim B = 2",
    ):
        with lora_routing(layer, [0, 1]):
            layer(x)
    with pytest.raises(ValueError, match=r"expected N = 5 rows \(per-token"):
        with lora_routing(layer, torch.zeros(5, dtype=torch.long), per_token=True):
            layer(x)
    with pytest.raises(ValueError, match=r"cu_seqlens must have shape \[B\+1\] = \[4\]"):
        with lora_routing(layer, [0, 1, 2], cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)):
            pass
    with pytest.raises(ValueError, match="rank of adapter 'classification' is 9 > r_max = 8"):
        MultiLoRALinear(torch.nn.Linear(4, 4), ADAPTERS, [2, 2, 9, 2], r_max=8)
    with pytest.raises(ValueError, match=r"rank 9 of adapter 'text-matching' must be in \[0, r_max = 8\]"):
        layer.set_adapter_weights("text-matching", torch.randn(9, 37), torch.randn(29, 9), 1.0)
    with pytest.raises(ValueError, match=r"expected a \[rank, 37\] and b \[29, rank\]"):
        layer.set_adapter_weights(0, torch.randn(2, 37), torch.randn(29, 3), 1.0)
    with pytest.raises(ValueError, match="one value per adapter"):
        MultiLoRALinear(torch.nn.Linear(4, 4), ADAPTERS, [2, 2])
    with pytest.raises(TypeError, match="single str"):
        with lora_routing(layer, "classification"):
            pass


def test_apply_multi_lora_errors():
    with pytest.raises(ValueError, match="match no module; nn.Linear names"):
        apply_multi_lora(TinyBlock(), ["qkv"], ADAPTERS, rank=2)
    with pytest.raises(TypeError, match="not nn.Linear"):
        apply_multi_lora(nn.Sequential(nn.Sequential(nn.Linear(3, 3))), ["0"], ADAPTERS, rank=2)
    model = TinyBlock()
    apply_multi_lora(model, ["q_proj"], ADAPTERS, rank=2)
    with pytest.raises(ValueError, match="already has MultiLoRALinear"):
        apply_multi_lora(model, ["k_proj"], ADAPTERS, rank=2)
    with pytest.raises(ValueError, match="has no MultiLoRALinear layers"):
        with lora_routing(TinyBlock(), [0]):
            pass
    with pytest.raises(RuntimeError, match="MultiLoRALinear 'q_proj': no adapter routing is set"):
        model(torch.randn(2, 24))
