"""The CUDA C++ masked-logsumexp kernels (csrc/infonce/), exposed as torch ops.

The schemas are defined here in Python and the CUDA implementations are registered by the
compiled extension with TORCH_LIBRARY_IMPL; the fake implementations (``_shapes``) let
torch.compile trace the ops without running them. The wrappers take the candidate rule's fields
by keyword (``**rule.keywords()``) and pass them on by keyword.
"""

from __future__ import annotations

from typing import Any

import torch

from ..._extension import load_extension
from ._shapes import fake_backward, fake_forward

_lib = torch.library.Library("latentembed", "FRAGMENT")
# The names are CandidateRule's fields: callers pass them by keyword.
_RULE = (
    "Tensor? pos_index, Tensor? pos_score, Tensor? doc_owner, Tensor? doc_key, Tensor? pos_key, "
    "float? threshold, float? margin, bool exclude_diagonal"
)
_lib.define(f"infonce_lse_fwd_cuda(Tensor q, Tensor d, Tensor scale, {_RULE}) -> (Tensor, Tensor, Tensor)")
_lib.define(
    f"infonce_lse_bwd_cuda(Tensor grad_lse, Tensor q, Tensor d, Tensor scale, Tensor lse, {_RULE}, "
    "bool subtract_positive) -> (Tensor, Tensor, Tensor)"
)
torch.library.register_fake("latentembed::infonce_lse_fwd_cuda", fake_forward, lib=_lib)
torch.library.register_fake("latentembed::infonce_lse_bwd_cuda", fake_backward, lib=_lib)


def infonce_lse_fwd_cuda(q: torch.Tensor, d: torch.Tensor, scale: torch.Tensor, **rule: Any):
    """(lse [B] fp32, n_above [B] int64, s_pos [B] fp32) of the CUDA kernels; ``rule``: the
    CandidateRule fields by keyword (see :class:`~latentembed.ops.infonce.rule.CandidateRule`)."""
    load_extension()
    return torch.ops.latentembed.infonce_lse_fwd_cuda(q, d, scale, **rule)


def infonce_lse_bwd_cuda(
    grad_lse: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    lse: torch.Tensor,
    *,
    subtract_positive: bool,
    **rule: Any,
):
    """(grad_q, grad_d, grad_scale) of the CUDA kernels; ``rule`` as in :func:`infonce_lse_fwd_cuda`."""
    load_extension()
    return torch.ops.latentembed.infonce_lse_bwd_cuda(
        grad_lse, q, d, scale, lse, subtract_positive=subtract_positive, **rule
    )
