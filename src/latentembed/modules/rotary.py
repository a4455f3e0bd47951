"""Rotary position embeddings (RoPE), with Llama-3 frequency scaling and packed positions.

Convention of the Mistral / Llama / Qwen2 checkpoints: the head dim is split in two halves
(not interleaved pairs); ``x * cos + rotate_half(x) * sin``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: Optional[dict] = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, Llama-3 scaled when ``scaling`` says so.

    Llama 3 scaling keeps high frequencies (wavelength below ``original / high_freq_factor``),
    divides low ones (wavelength above ``original / low_freq_factor``) by ``factor`` and blends
    linearly in between.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if not scaling:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., N, H, d] by ``cos``/``sin`` [..., N, d] (broadcast over heads H)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    # Under autocast q/k are bf16 while cos/sin follow the fp32 residual stream: compute in the
    # wider type, hand back the input dtype (attention kernels need q, k, v in one dtype).
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Positions [T] (int64) restarting at 0 at every sequence start of ``cu_seqlens`` [B+1].

    Uses a searchsorted (static output shape) so it traces under torch.compile without a sync.
    """
    rows = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), rows, right=True)
    return rows - cu_seqlens.long()[seq]


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions [B, L] counting real tokens only, so left and right padding give the same
    positions to the same tokens (padding slots get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class RotaryEmbedding(nn.Module):
    """Computes ``cos, sin`` [..., d] for integer positions [...].

    ``inv_freq`` is a non-persistent buffer (checkpoints do not carry it) that stays fp32 when
    the module is cast (``model.to(torch.bfloat16)`` moves it but keeps its dtype); cos/sin are
    computed in fp32 and cast to ``dtype`` as the reference implementation does.

    Example:
        >>> rope = RotaryEmbedding(16, theta=10000.0)
        >>> cos, sin = rope(torch.arange(7), torch.float32)
        >>> cos.shape
        torch.Size([7, 16])
    """

    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict] = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", rope_inverse_frequencies(head_dim, theta, scaling), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # nn.Module.to(dtype) / .half() / .bfloat16() cast every floating buffer: bf16 inverse
        # frequencies put angle errors of ~0.1 rad on positions < 512, growing with position.
        # Keep the fp32 values and follow only the device change.
        master = self.inv_freq
        super()._apply(fn, recurse)
        moved = self.inv_freq
        if moved.dtype != torch.float32:
            if master.device.type == "meta" or moved.device.type == "meta":
                self.inv_freq = moved.float()  # no values to keep; reset_parameters fills them
            else:
                self.inv_freq = master.to(moved.device)
        return self

    def reset_parameters(self, device: Optional[torch.device] = None) -> None:
        """Recompute ``inv_freq`` (after building the model on the meta device)."""
        self.inv_freq = rope_inverse_frequencies(self.head_dim, self.theta, self.scaling).to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Autocast must not turn the angle product into bf16: large positions need fp32.
        with torch.autocast(device_type=positions.device.type, enabled=False):
            freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(dtype), emb.sin().to(dtype)
