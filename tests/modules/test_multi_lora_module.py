"""MultiLoRALinear: mixed batches, gradients vs a float64 per-row loop, ranks, -1, routing, merge."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from latentembed.modules import adapter_routing as routing_mod
from latentembed.modules import lora as lora_mod
from latentembed.modules.lora import MultiLoRALinear, lora_routing
from latentembed.modules.lora_dropout import draw_seed, seeded_dropout
from tests.tolerances import assert_within_budget

from .multi_lora_helpers import ADAPTERS, RANKS, backend_params, random_layer, reference_forward

BACKENDS = backend_params()


def _row_index(tasks, lead):
    """Per-row ids of per-sample tasks broadcast over [B, L, ...]."""
    t = torch.tensor(tasks)
    return t[:, None].expand(len(tasks), int(torch.tensor(lead[1:]).prod()) if len(lead) > 1 else 1).reshape(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 2, 3)], ids=["B1-L1", "B3-L7", "B5-2x3"])
def test_mixed_batch_equals_each_sample_alone(backend, shape):
    layer = random_layer(backend=backend)
    b = shape[0]
    tasks = ([-1, 0, 3, 2, 1] * 2)[:b] if b > 1 else [1]
    x = torch.randn(*shape, layer.in_features)
    with lora_routing(layer, tasks):
        mixed = layer(x)
    exact, _ = reference_forward(layer, x, _row_index(tasks, shape))
    lowp, _ = reference_forward(layer, x, _row_index(tasks, shape), dtype=torch.float32)
    assert_within_budget("mixed", mixed, lowp, exact)
    for i, task in enumerate(tasks):
        with lora_routing(layer, [ADAPTERS[task] if task >= 0 else "base"]):
            alone = layer(x[i : i + 1])
        assert_within_budget(f"sample {i} alone", alone[0], lowp[i], exact[i])
        torch.testing.assert_close(mixed[i], alone[0], rtol=1e-5, atol=1e-5 * exact.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "packed", "per_token"])
def test_gradients_match_float64_loop(backend, layout):
    """Every gradient (x, A, B and the unfrozen base weight/bias) under a random upstream gradient."""
    layer = random_layer(backend=backend, freeze_base=False)
    tasks = [2, -1, 0, 3, 1, 0]
    if layout == "padded":
        x = torch.randn(len(tasks), 5, layer.in_features)
        rows, kw = _row_index(tasks, x.shape[:-1]), {}
    elif layout == "packed":
        lengths = torch.tensor([4, 1, 7, 3, 5, 2])
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
        x = torch.randn(int(lengths.sum()), layer.in_features)
        rows, kw = torch.repeat_interleave(torch.tensor(tasks), lengths), {"cu_seqlens": cu}
    else:
        x = torch.randn(2, 9, layer.in_features)
        rows = torch.randint(-1, len(ADAPTERS), (18,))
        tasks, kw = rows, {"per_token": True}
    x.requires_grad_()
    with lora_routing(layer, tasks, **kw):
        out = layer(x)
    grad_out = torch.randn_like(out)
    params = [x, layer.weight, layer.bias, layer.lora_a, layer.lora_b]
    grads = torch.autograd.grad(out, params, grad_out)
    exact, leaves64 = reference_forward(layer, x, rows, grads=True)
    lowp, leaves32 = reference_forward(layer, x, rows, dtype=torch.float32, grads=True)
    assert_within_budget("out", out, lowp.detach(), exact.detach())
    g64 = torch.autograd.grad(exact, leaves64, grad_out.double())
    g32 = torch.autograd.grad(lowp, leaves32, grad_out)
    for name, g, lo, ex in zip(["x", "weight", "bias", "lora_a", "lora_b"], grads, g32, g64):
        assert_within_budget(f"grad {name}", g, lo, ex)
    # The zero pads of the smaller ranks get exactly zero gradient (so optimisers keep them zero).
    for t, r in enumerate(RANKS):
        assert torch.all(grads[3][t, r:] == 0) and torch.all(grads[4][t, :, r:] == 0)


def test_gradcheck_float64():
    layer = random_layer(d_in=6, d_out=5, dtype=torch.float64)
    x = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    a = layer.lora_a.detach().clone().requires_grad_()
    b = layer.lora_b.detach().clone().requires_grad_()
    with lora_routing(layer, [1, -1, 3]):
        assert torch.autograd.gradcheck(
            lambda x, a, b: torch.func.functional_call(layer, {"lora_a": a, "lora_b": b}, (x,)), (x, a, b)
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_only_rows_are_exactly_the_base_layer(backend):
    layer = random_layer(backend=backend)
    x = torch.randn(4, 3, layer.in_features)
    base = F.linear(x, layer.weight, layer.bias)
    with lora_routing(layer, [-1, 0, "base", 2]):
        out = layer(x)
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert not torch.allclose(out[1], base[1])  # the adapter really contributes (B is not zero)
    with lora_routing(layer, ["base"] * 4):
        assert torch.equal(layer(x), base)


def test_packed_equals_padded():
    layer = random_layer()
    lengths = [3, 1, 0, 5]
    tasks = ["classification", "retrieval.query", "text-matching", "base"]
    padded = torch.randn(4, 5, layer.in_features)
    keep = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    packed = padded[keep]
    cu = torch.tensor([0, 3, 4, 4, 9], dtype=torch.int32)
    with lora_routing(layer, tasks):
        ref = layer(padded)[keep]
    with lora_routing(layer, tasks, cu_seqlens=cu):
        flat, batched = layer(packed), layer(packed[None])
    torch.testing.assert_close(flat, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[0], ref, rtol=1e-5, atol=1e-5)


def test_explicit_adapter_index_per_row_and_per_sample():
    layer = random_layer()
    x = torch.randn(3, 4, layer.in_features)
    with lora_routing(layer, [0, 2, -1]):
        routed = layer(x)
    torch.testing.assert_close(layer(x, adapter_index=torch.tensor([0, 2, -1])), routed)
    per_row = torch.tensor([0, 2, -1]).repeat_interleave(4)
    torch.testing.assert_close(layer(x.reshape(12, -1), adapter_index=per_row).reshape(3, 4, -1), routed)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("merged", [False, True], ids=["routed", "merged"])
def test_explicit_adapter_index_reads_the_device_once(monkeypatch, merged):
    """adapter_index= costs one host read per call: group_by_adapter's (or, while merged, the
    unique ids); no separate range check (min/max) or unique on the routed path."""
    layer = random_layer()
    x = torch.randn(3, 4, layer.in_features)
    ids = torch.tensor([0, 2, -1]) if not merged else torch.tensor([1, 1, 1])
    grouping = routing_mod.group_by_adapter(ids.repeat_interleave(4), layer.num_adapters)
    calls = []
    monkeypatch.setattr(routing_mod, "group_by_adapter", lambda idx, t: calls.append(idx.shape) or grouping)
    if merged:
        layer.merge(1)
    with _RecordOps() as rec:
        out = layer(x, adapter_index=ids)
    names = [op.split(".")[0] for op in rec.ops]
    host_reads = [op for op in names if op in ("min", "max", "_unique2", "_local_scalar_dense")]
    assert (calls, host_reads) == (([], ["_unique2"]) if merged else ([torch.Size([12])], []))
    with lora_routing(layer, ids.tolist()):
        torch.testing.assert_close(out, layer(x))


def test_grouping_is_computed_once_per_forward(monkeypatch):
    calls = []
    real = routing_mod.group_by_adapter
    monkeypatch.setattr(routing_mod, "group_by_adapter", lambda idx, t: calls.append(idx.shape) or real(idx, t))
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 8))
    lora_mod.apply_multi_lora(model, ["0", "2", "4"], ADAPTERS, rank=4, alpha=8)
    x = torch.randn(3, 5, 12)
    with lora_routing(model, [0, 1, 3]):
        model(x)
        model(x)  # same rows, same routing: still cached
    assert calls == [torch.Size([15])]
    with lora_routing(model, [0, 1, 3]):
        model(x)
    assert len(calls) == 2  # a new routing block groups again


def test_routing_restores_on_exit_and_nests():
    layer = random_layer()
    x = torch.randn(2, layer.in_features)
    with lora_routing(layer, [0, 1]) as routing:
        outer = layer(x)
        with lora_routing(layer, [-1, -1]):
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        torch.testing.assert_close(layer(x), outer)
    assert not routing.active


def test_missing_routing_raises_or_uses_default():
    layer = random_layer()
    x = torch.randn(2, layer.in_features)
    with pytest.raises(RuntimeError, match="no adapter routing is set"):
        layer(x)
    layer.routing.default_adapter = -1
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer.routing.default_adapter = "classification"
    default_out = layer(x)
    with lora_routing(layer, [2, 2]):
        torch.testing.assert_close(default_out, layer(x))
    with pytest.raises(KeyError, match="default_adapter: unknown adapter name 'nope'"):
        layer.routing.default_adapter = "nope"


def test_routing_tells_a_layer_its_rows_through_public_methods():
    """What MultiLoRALinear reads from its LoRARouting: routed_rows (None when nothing is set)
    and default_rows (one grouping per row count and device, kept across forwards)."""
    layer = random_layer()
    routing, lead = layer.routing, torch.Size([2, 3])
    assert routing.routed_rows(lead, torch.device("cpu"), "layer") is None
    with lora_routing(layer, [0, "base"]):
        rows = routing.routed_rows(lead, torch.device("cpu"), "layer")
        assert isinstance(rows, routing_mod.RoutedRows)
        assert rows.index.tolist() == [0, 0, 0, -1, -1, -1] and rows.present == {0, -1}
        assert rows.grouping.num_active == 3  # rows with an adapter
    assert routing.routed_rows(lead, torch.device("cpu"), "layer") is None
    with pytest.raises(ValueError, match="default_adapter"):
        routing.default_rows(lead, torch.device("cpu"), "layer")
    routing.default_adapter = 1
    first = routing.default_rows(lead, torch.device("cpu"), "layer")
    assert first.index.tolist() == [1] * 6 and first.present == {1}
    assert routing.default_rows(lead, torch.device("cpu"), "layer") is first
    routing.default_adapter = "base"
    assert routing.default_rows(lead, torch.device("cpu"), "layer").grouping is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(dtype):
    layer = random_layer(dtype=dtype)
    x = torch.randn(3, 4, layer.in_features, dtype=dtype)
    original = layer.weight.detach().clone()
    with lora_routing(layer, ["retrieval.passage"] * 3):
        routed = layer(x)
    delta = layer.delta_weight("retrieval.passage")
    layer.merge("retrieval.passage")
    merged_unrouted = layer(x)  # no routing: runs the merged adapter
    with lora_routing(layer, ["retrieval.passage"] * 3):
        merged = layer(x)
        with pytest.raises(RuntimeError, match="already merged"):
            layer.merge(0)
    assert torch.equal(merged, merged_unrouted)
    exact = (x.double() @ (original.double() + delta.double()).T) + layer.bias.double()
    tol = 4 * torch.finfo(dtype).eps * (x.double().abs() @ (original.double().abs() + delta.double().abs()).T).max()
    assert (merged.double() - exact).abs().max() <= tol
    assert (routed.double() - exact).abs().max() <= tol
    with lora_routing(layer, ["retrieval.passage", "classification", "retrieval.passage"]):
        with pytest.raises(RuntimeError, match="merged into the weight"):
            layer(x)
    with lora_routing(layer, ["base"] * 3):
        with pytest.raises(RuntimeError, match="merged into the weight"):
            layer(x)
    layer.unmerge()
    # Restored within one rounding of the weight dtype (w + d - d), not bit-exact in general.
    bound = torch.finfo(dtype).eps * (original.double().abs() + delta.double().abs())
    assert torch.all((layer.weight.double() - original.double()).abs() <= bound)
    with pytest.raises(RuntimeError, match="no adapter is merged"):
        layer.unmerge()


def test_dropout_applies_to_the_adapter_input_only():
    layer = random_layer(dropout=0.5)
    x = torch.randn(4, 3, layer.in_features)
    tasks = [0, 1, -1, 3]
    rows = _row_index(tasks, x.shape[:-1])
    with lora_routing(layer, tasks):
        layer.eval()
        exact, _ = reference_forward(layer, x, rows)
        torch.testing.assert_close(layer(x), exact.float(), rtol=1e-5, atol=1e-4)
        layer.train()
        torch.manual_seed(7)
        out = layer(x)
        torch.manual_seed(7)
        # The layer's mask comes from a seed drawn from the default generator (modules/lora_dropout.py)
        dropped = seeded_dropout(x.reshape(-1, layer.in_features), 0.5, draw_seed())
    base = F.linear(x.reshape(-1, layer.in_features), layer.weight, layer.bias).double()
    lora_only, _ = reference_forward(layer, dropped, rows)
    lora_only -= F.linear(dropped.double(), layer.weight.double(), layer.bias.double())
    torch.testing.assert_close(out.reshape(-1, layer.out_features).double(), base + lora_only, rtol=1e-5, atol=1e-4)


def test_peft_style_init_starts_at_the_base_layer():
    layer = MultiLoRALinear(nn.Linear(10, 6), ADAPTERS, RANKS)
    assert torch.all(layer.lora_b == 0) and not layer.weight.requires_grad
    for t, r in enumerate(RANKS):
        assert torch.all(layer.lora_a[t, :r] != 0) and torch.all(layer.lora_a[t, r:] == 0)
    assert layer.scalings == [1.0] * len(ADAPTERS)  # alpha defaults to rank


def test_state_dict_round_trip():
    layer = random_layer()
    fresh = MultiLoRALinear(nn.Linear(37, 29), ADAPTERS, rank=8)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.ranks == layer.ranks and fresh.scalings == layer.scalings
    x = torch.randn(3, 37)
    with lora_routing(layer, [0, 1, 2]), lora_routing(fresh, [0, 1, 2]):
        assert torch.equal(fresh(x), layer(x))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_mixed_batch_and_gradients(dtype):
    """The auto backend (Triton on CUDA) in bf16/fp16 against float64, budget from the reference in dtype."""
    layer = random_layer(d_in=160, d_out=136, dtype=dtype).cuda()
    tasks = [3, -1, 0, 2, 1, 0, 3]
    x = torch.randn(len(tasks), 37, 160, device="cuda", dtype=dtype, requires_grad=True)
    rows = _row_index(tasks, x.shape[:-1])
    with lora_routing(layer, tasks):
        out = layer(x)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, layer.lora_a, layer.lora_b], grad_out)
    layer.backend = "reference"  # PyTorch's own result in dtype: the error budget
    with lora_routing(layer, tasks):
        lowp = layer(x)
    lowp_grads = torch.autograd.grad(lowp, [x, layer.lora_a, layer.lora_b], grad_out)
    exact, leaves = reference_forward(layer, x, rows, grads=True)
    exact_grads = torch.autograd.grad(exact, [leaves[0], leaves[3], leaves[4]], grad_out.double())
    assert_within_budget("out", out, lowp, exact.detach())
    for name, g, lo, ex in zip(["x", "lora_a", "lora_b"], grads, lowp_grads, exact_grads):
        assert_within_budget(f"grad {name}", g, lo, ex)
