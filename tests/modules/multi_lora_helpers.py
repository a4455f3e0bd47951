"""Shared pieces of the MultiLoRALinear tests: random layers, the float64 per-row reference, backends."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from latentembed.modules.lora import MultiLoRALinear

ADAPTERS = ["retrieval.query", "retrieval.passage", "classification", "text-matching"]
RANKS = [8, 3, 1, 5]  # different ranks per adapter, r_max = 8
ALPHAS = [16.0, 3.0, 0.5, 10.0]


def triton_skip_reason():
    """Why the op's Triton backend cannot be exercised here (None when it can)."""
    from latentembed.ops import multi_lora

    spec = next((b for b in multi_lora.BACKENDS if b.name == "triton"), None)
    if spec is None:
        return "multi_lora_linear_add has no triton backend yet"
    try:
        from latentembed.ops.multi_lora import triton  # noqa: F401
    except ImportError as e:
        return f"latentembed.ops.multi_lora.triton does not import: {e}"
    return spec.why_not(torch.device("cpu"), torch.float32, torch.zeros(1, 8, 1))


def backend_params():
    """reference always; triton (fp32, through the interpreter on CPU) when it exists."""
    reason = triton_skip_reason()
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return [pytest.param("reference", id="reference"), pytest.param("triton", id="triton", marks=marks)]


def random_layer(
    d_in=37, d_out=29, backend="reference", dtype=torch.float32, freeze_base=True, **kw
) -> MultiLoRALinear:
    """A MultiLoRALinear with random non-zero A and B (B is zero after PEFT-style init)."""
    layer = MultiLoRALinear(
        nn.Linear(d_in, d_out).to(dtype), ADAPTERS, RANKS, ALPHAS, backend=backend, freeze_base=freeze_base, **kw
    )
    randomize(layer)
    return layer


@torch.no_grad()
def randomize(layer: MultiLoRALinear) -> None:
    """Random A and B on each adapter's own rank (pads stay zero)."""
    for t, rank in enumerate(layer.ranks):
        layer.lora_a[t, :rank].normal_(0.0, 0.3)
        layer.lora_b[t, :, :rank].normal_(0.0, 0.3)


def reference_rows(x2, weight, bias, lora_a, lora_b, ranks, scalings, index):
    """Plain per-row loop: y_n = x_n W^T + b + s_t (x_n A_t^T) B_t^T (t = index[n], -1: no adapter)."""
    rows = []
    for n in range(x2.shape[0]):
        y = x2[n] @ weight.T
        if bias is not None:
            y = y + bias
        t = int(index[n])
        if t >= 0 and ranks[t] > 0:
            r = ranks[t]
            y = y + scalings[t] * ((x2[n] @ lora_a[t, :r].T) @ lora_b[t, :, :r].T)
        rows.append(y)
    return torch.stack(rows)


def reference_forward(
    layer: MultiLoRALinear, x: torch.Tensor, row_index: torch.Tensor, dtype=torch.float64, grads: bool = False
):
    """The layer's output by the per-row loop in ``dtype``; with ``grads`` also returns the leaves
    (x, weight, bias, lora_a, lora_b) that require grad, for autograd.grad."""
    leaves = [t.detach().to(dtype).requires_grad_(grads) for t in (x, layer.weight, layer.lora_a, layer.lora_b)]
    bias = None if layer.bias is None else layer.bias.detach().to(dtype).requires_grad_(grads)
    xr, w, a, b = leaves
    out = reference_rows(xr.reshape(-1, layer.in_features), w, bias, a, b, layer.ranks, layer.scalings, row_index)
    return out.reshape(*x.shape[:-1], layer.out_features), (xr, w, bias, a, b)
