"""The CUDA C++ latent-attention kernels (csrc/latent_attention/), exposed as torch ops.

The schemas are defined here in Python and the CUDA implementations are registered by the
compiled extension with TORCH_LIBRARY_IMPL; the fake implementations let torch.compile trace
the ops without running them.

* ``latent_attn_fwd_cuda`` / ``latent_attn_bwd_cuda``: latent cross-attention, the same
  contract as the Triton launchers (forward returns ``(y, P, mean, rstd)``, P [T, H*R] in x's
  dtype, mean/rstd [T] float32, saved for the backward). The GEMMs run in cuBLAS through ATen,
  the LayerNorm, per-head softmax and their backwards in the extension's kernels (see the header
  of csrc/latent_attention/latent_cross_attention_host.cpp).
* ``geglu_segment_mean_fwd_cuda`` / ``geglu_segment_mean_bwd_cuda``.
"""

from __future__ import annotations

import torch

from ..._extension import load_extension
from ._shapes import grad_a_shape, segment_mean_shape

_lib = torch.library.Library("latentembed", "FRAGMENT")
_lib.define("geglu_segment_mean_fwd_cuda(Tensor a, Tensor cu_seqlens) -> Tensor")
_lib.define("geglu_segment_mean_bwd_cuda(Tensor grad_out, Tensor a, Tensor cu_seqlens) -> Tensor")
_lib.define(
    "latent_attn_fwd_cuda(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor m, Tensor u, "
    "float eps) -> (Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    "latent_attn_bwd_cuda(Tensor grad_y, Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor m, "
    "Tensor u, Tensor probs, Tensor mean, Tensor rstd, bool need_dm, bool need_du) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("latentembed::geglu_segment_mean_fwd_cuda", lib=_lib)
def _(a, cu_seqlens):
    return a.new_empty(segment_mean_shape(a, cu_seqlens))


@torch.library.register_fake("latentembed::geglu_segment_mean_bwd_cuda", lib=_lib)
def _(grad_out, a, cu_seqlens):
    return a.new_empty(grad_a_shape(grad_out, a.shape[0]))


@torch.library.register_fake("latentembed::latent_attn_fwd_cuda", lib=_lib)
def _(x, ln_weight, ln_bias, m, u, eps):
    T = x.shape[0]
    stats = x.new_empty(T, dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(T, m.shape[0] * m.shape[1]), stats, stats.new_empty(T)


@torch.library.register_fake("latentembed::latent_attn_bwd_cuda", lib=_lib)
def _(grad_y, x, ln_weight, ln_bias, m, u, probs, mean, rstd, need_dm, need_du):
    return (
        x.new_empty(x.shape),
        ln_weight.new_empty(ln_weight.shape),
        ln_bias.new_empty(ln_bias.shape),
        m.new_empty(m.shape if need_dm else (0,)),
        u.new_empty(u.shape if need_du else (0,)),
    )


def geglu_segment_mean_fwd_cuda(a: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    load_extension()
    return torch.ops.latentembed.geglu_segment_mean_fwd_cuda(a, cu_seqlens)


def geglu_segment_mean_bwd_cuda(grad_out: torch.Tensor, a: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    load_extension()
    return torch.ops.latentembed.geglu_segment_mean_bwd_cuda(grad_out, a, cu_seqlens)


def latent_attn_fwd_cuda(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    m: torch.Tensor,
    u: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, D], m/u [H, R, D] in x's dtype -> (y [T, D], P [T, H*R], mean, rstd [T])."""
    load_extension()
    return torch.ops.latentembed.latent_attn_fwd_cuda(x, ln_weight, ln_bias, m, u, eps)


def latent_attn_bwd_cuda(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    m: torch.Tensor,
    u: torch.Tensor,
    probs: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    need_dm: bool,
    need_du: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, d ln_weight, d ln_bias, dm, du); dm/du are empty when not needed."""
    load_extension()
    return torch.ops.latentembed.latent_attn_bwd_cuda(
        grad_y, x, ln_weight, ln_bias, m, u, probs, mean, rstd, need_dm, need_du
    )
