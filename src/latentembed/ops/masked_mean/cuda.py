"""The CUDA C++ masked-mean kernels (csrc/masked_mean/), exposed as torch ops.

The schemas are defined here in Python and the CUDA implementations are registered by the
compiled extension with TORCH_LIBRARY_IMPL; the fake implementations below let torch.compile
trace the ops without running them.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._extension import load_extension
from ._shapes import grad_hidden_shape, pooled_shape

_lib = torch.library.Library("latentembed", "FRAGMENT")
_lib.define("masked_mean_fwd_cuda(Tensor hidden, Tensor? mask, Tensor? cu_seqlens) -> Tensor")
_lib.define("masked_mean_bwd_cuda(Tensor grad_out, Tensor? mask, Tensor? cu_seqlens, SymInt length) -> Tensor")


@torch.library.register_fake("latentembed::masked_mean_fwd_cuda", lib=_lib)
def _(hidden, mask, cu_seqlens):
    return hidden.new_empty(pooled_shape(hidden, cu_seqlens))


@torch.library.register_fake("latentembed::masked_mean_bwd_cuda", lib=_lib)
def _(grad_out, mask, cu_seqlens, length):
    return grad_out.new_empty(grad_hidden_shape(grad_out, cu_seqlens, length))


def _bool_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # The kernel reads one byte per position; integer masks (HF's int64 attention_mask) are
    # B*L elements, so converting them costs next to nothing next to the [B, L, D] read.
    return mask if mask is None or mask.dtype == torch.bool else mask != 0


def masked_mean_fwd_cuda(
    hidden: torch.Tensor, mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor]
) -> torch.Tensor:
    load_extension()
    return torch.ops.latentembed.masked_mean_fwd_cuda(hidden, _bool_mask(mask), cu_seqlens)


def masked_mean_bwd_cuda(
    grad_out: torch.Tensor,
    mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    length: int,
) -> torch.Tensor:
    load_extension()
    return torch.ops.latentembed.masked_mean_bwd_cuda(grad_out, _bool_mask(mask), cu_seqlens, length)
