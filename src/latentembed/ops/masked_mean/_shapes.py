"""Output shapes of the masked-mean kernels, shared by the launchers and the fake (meta) ops."""

from __future__ import annotations

from typing import Optional

import torch


def pooled_shape(hidden: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> tuple:
    """[B, D]: B from cu_seqlens [B+1] when packed, else from hidden [B, L, D]."""
    batch = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else hidden.shape[0]
    return (batch, hidden.shape[-1])


def grad_hidden_shape(grad_out: torch.Tensor, cu_seqlens: Optional[torch.Tensor], length: int) -> tuple:
    """Gradient of hidden: packed [T=length, D], padded [B, L=length, D]."""
    batch, D = grad_out.shape
    return (length, D) if cu_seqlens is not None else (batch, length, D)
