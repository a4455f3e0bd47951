"""Output shapes of the latent-attention kernels, shared by the launchers and the fake ops."""

from __future__ import annotations

import torch


def segment_mean_shape(a: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple:
    """[B, F]: B from cu_seqlens [B+1], F half of a's [T, 2F] columns."""
    return (cu_seqlens.shape[0] - 1, a.shape[1] // 2)


def grad_a_shape(grad_out: torch.Tensor, length: int) -> tuple:
    """Gradient of a: [T=length, 2F] from grad_out [B, F]."""
    return (length, 2 * grad_out.shape[1])
