"""scripts/step_memory_breakdown.py counts every tensor autograd saves once per storage, and the
seeded LoRA dropout saves less than dropout stored as a mask and a dropped copy."""

import importlib.util
from pathlib import Path

import torch

from latentembed.modules.lora import MultiLoRALinear

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "step_memory_breakdown.py"


def _script():
    spec = importlib.util.spec_from_file_location("step_memory_breakdown", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_saved_storage_counts_once():
    count = _script().saved_bytes_by_node
    x = torch.randn(5, 7, requires_grad=True)
    y = torch.randn(5, 7, requires_grad=True)
    by_type, total = count((x * y).sum())
    assert total == 2 * 5 * 7 * 4 and by_type == {"MulBackward0": total}
    # x[:2] and x[2:] are views of one storage: counted once, by the first node that reaches it
    by_type, total = count((x[:2] * y[:2]).sum() + (x[2:] * y[2:]).sum())
    assert total == 2 * 5 * 7 * 4


def test_seeded_lora_dropout_saves_no_mask_and_no_copy():
    count = _script().saved_bytes_by_node
    torch.manual_seed(0)
    # q, k and v projections of one input, as in an attention block
    layers = [MultiLoRALinear(torch.nn.Linear(64, 32), adapters=1, rank=4, dropout=0.1).train() for _ in range(3)]
    x = torch.randn(50, 64, requires_grad=True)
    ids = torch.zeros(50, dtype=torch.long)
    _, seeded = count(sum(layer(x, ids).sum() for layer in layers))
    # the same layers with dropout as F.dropout before each adapter (PEFT's way)
    dropped = [torch.nn.functional.dropout(x, 0.1, training=True) for _ in layers]
    _, stored = count(
        sum(
            (
                torch.nn.functional.linear(x, layer.weight, layer.bias) + (d @ layer.lora_a[0].T) @ layer.lora_b[0].T
            ).sum()
            for layer, d in zip(layers, dropped)
        )
    )
    # stored keeps, per layer, a bool mask and a dropped fp32 copy of x [50, 64]; seeded keeps x
    # once (shared by the three layers; in a model the norm before them saves it anyway)
    assert stored - seeded >= 3 * 50 * 64 * (1 + 4) - 50 * 64 * 4
