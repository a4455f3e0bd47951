"""RMSNorm as the Mistral / Llama / Qwen2 families compute it."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim.

    The statistic is taken in fp32 and the normalised value is cast back to the input dtype
    *before* the weight multiplies it, as the reference checkpoints were trained (this order
    changes bf16 results, so it is kept).

    Shapes: ``x`` [..., D] -> [..., D].

    Example:
        >>> norm = RMSNorm(64)
        >>> norm(torch.randn(3, 64)).shape
        torch.Size([3, 64])
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.promote_types(dtype, torch.float32))  # fp32 at least, fp64 stays fp64
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
