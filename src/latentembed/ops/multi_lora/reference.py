"""Multi-LoRA linear in plain PyTorch: the specification the kernels are tested against."""

from __future__ import annotations

import torch


def multi_lora_linear_add_ref(
    base_out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    adapter_index: torch.Tensor,
) -> torch.Tensor:
    """``base_out + delta`` with ``delta_n = scaling[t] * (x_n @ lora_a[t].T) @ lora_b[t].T``, t = adapter_index[n].

    base_out [N, out], x [N, in], lora_a [T, R, in], lora_b [T, out, R], scaling [T] (any float
    dtype, not differentiated), adapter_index [N] int in [-1, T) (-1: delta is 0). Returns
    [N, out] in base_out's dtype. Differentiable by autograd in base_out, x, lora_a and lora_b.

    A loop over the adapters: each adapter's rows are gathered, multiplied by its own A and B
    only, and added back. So a row never meets another adapter's weights, and a NaN or inf in
    one adapter cannot reach other rows, forward or backward (a multiply of every row by every
    adapter with zero weights would let it in: 0 * NaN = NaN). When one adapter owns every row
    (a single-adapter fine-tune) x is used as is: no copy, and autograd saves only [N, R] more.
    Otherwise the gathered rows add up to one copy of x. Reading the row counts is one host
    sync (free on CPU; the Triton backend never syncs per layer). No argument checks (the public
    ``multi_lora_linear_add`` does those).
    """
    n, t = x.shape[0], lora_a.shape[0]
    key = torch.where(adapter_index < 0, t, adapter_index)  # base-only rows sort last
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=t + 1).tolist()
    scale = scaling.to(torch.float64 if x.dtype == torch.float64 else torch.float32).to(x.dtype)
    out, start = base_out, 0
    for adapter in range(t):
        # An adapter without rows still runs, on zero rows: its weights then get exact zero
        # gradients (as from the kernels) instead of none.
        count = counts[adapter]
        rows = order[start : start + count]
        start += count
        whole = count == n
        x_rows = x if whole else x.index_select(0, rows)
        delta = ((x_rows @ lora_a[adapter].T) * scale[adapter]) @ lora_b[adapter].T
        out = out + delta if whole else out.index_add(0, rows, delta)
    return out
