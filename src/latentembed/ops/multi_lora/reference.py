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

    No Python loop over adapters and no host sync: every row is multiplied by all T adapters'
    A (T*R columns, small), the columns of other adapters are zeroed with a one-hot weight that
    also carries the scale, and one matmul against all Bs side by side gives the expand (zero
    columns contribute exact zeros). Memory is O(N*T*R), never O(N*R*in). No argument checks
    (the public ``multi_lora_linear_add`` does those).
    """
    n = x.shape[0]
    t, r, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    xa = (x @ lora_a.reshape(t * r, d_in).T).view(n, t, r)  # [N, T, R]
    onehot = adapter_index[:, None] == torch.arange(t, device=x.device)[None, :]  # [N, T]
    weight = torch.where(onehot, scaling.to(torch.float32 if x.dtype != torch.float64 else x.dtype), 0.0)
    xa = (xa * weight.to(x.dtype)[:, :, None]).reshape(n, t * r)
    b_side_by_side = lora_b.permute(1, 0, 2).reshape(d_out, t * r)  # [out, T*R]
    return base_out + xa @ b_side_by_side.T
