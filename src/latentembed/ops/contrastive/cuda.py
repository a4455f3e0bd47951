"""The CUDA C++ masked-logsumexp kernels (csrc/contrastive/), exposed as torch ops.

The schemas are defined here in Python and the CUDA implementations are registered by the
compiled extension with TORCH_LIBRARY_IMPL; the fake implementations let torch.compile trace
the ops without running them.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._extension import load_extension

_lib = torch.library.Library("latentembed", "FRAGMENT")
_OPTIONS = (
    "Tensor? pos_index, Tensor? pos_score, Tensor? doc_owner, Tensor? doc_key, Tensor? pos_key, "
    "float? threshold, float? margin, bool exclude_diagonal"
)
_lib.define(f"infonce_lse_fwd_cuda(Tensor q, Tensor d, Tensor scale, {_OPTIONS}) -> (Tensor, Tensor, Tensor)")
_lib.define(
    f"infonce_lse_bwd_cuda(Tensor grad_lse, Tensor q, Tensor d, Tensor scale, Tensor lse, {_OPTIONS}, "
    "bool subtract_positive) -> (Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("latentembed::infonce_lse_fwd_cuda", lib=_lib)
def _(q, d, scale, pos_index, pos_score, doc_owner, doc_key, pos_key, threshold, margin, exclude_diagonal):
    B = q.shape[0]
    n_pos = B if pos_index is not None else 0
    return (q.new_empty(B, dtype=torch.float32), q.new_empty(B, dtype=torch.int64),
            q.new_empty(n_pos, dtype=torch.float32))


@torch.library.register_fake("latentembed::infonce_lse_bwd_cuda", lib=_lib)
def _(grad_lse, q, d, scale, lse, pos_index, pos_score, doc_owner, doc_key, pos_key, threshold, margin,
      exclude_diagonal, subtract_positive):
    return torch.empty_like(q), torch.empty_like(d), q.new_empty((), dtype=torch.float32)


def infonce_lse_fwd_cuda(
    q: torch.Tensor, d: torch.Tensor, scale: torch.Tensor,
    pos_index: Optional[torch.Tensor], pos_score: Optional[torch.Tensor],
    doc_owner: Optional[torch.Tensor], doc_key: Optional[torch.Tensor], pos_key: Optional[torch.Tensor],
    threshold: Optional[float], margin: Optional[float], exclude_diagonal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    load_extension()
    return torch.ops.latentembed.infonce_lse_fwd_cuda(
        q, d, scale, pos_index, pos_score, doc_owner, doc_key, pos_key, threshold, margin, exclude_diagonal
    )


def infonce_lse_bwd_cuda(
    grad_lse: torch.Tensor, q: torch.Tensor, d: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor,
    pos_index: Optional[torch.Tensor], pos_score: Optional[torch.Tensor],
    doc_owner: Optional[torch.Tensor], doc_key: Optional[torch.Tensor], pos_key: Optional[torch.Tensor],
    threshold: Optional[float], margin: Optional[float], exclude_diagonal: bool,
    subtract_positive: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    load_extension()
    return torch.ops.latentembed.infonce_lse_bwd_cuda(
        grad_lse, q, d, scale, lse, pos_index, pos_score, doc_owner, doc_key, pos_key, threshold, margin,
        exclude_diagonal, subtract_positive,
    )
