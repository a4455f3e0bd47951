"""Latent cross-attention and GEGLU segment mean in plain PyTorch: the spec the kernels follow.

Both functions are differentiable by autograd and do no argument checks (the public functions in
``latentembed.ops.latent_attention`` do those). Math runs in at least float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def latent_cross_attention_ref(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    m: torch.Tensor,
    u: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``y = x + sum_h softmax_R(LN(x) @ m[h]^T) @ u[h]`` with folded per-head matrices.

    x [T, D]; ln_weight, ln_bias [D]; m, u [H, R, D]. ``m`` already carries the 1/sqrt(dim_head)
    scale. m and u are first rounded to x's dtype (the kernels multiply in x's dtype on tensor
    cores); LayerNorm, scores, softmax and the weighted sum then run in float32 (float64 stays
    float64) and the result is cast to x's dtype. Autocast is ignored (disabled inside).
    """
    acc = _acc_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        xa = x.to(acc)
        xn = F.layer_norm(xa, (x.shape[-1],), ln_weight.to(acc), ln_bias.to(acc), eps)
        scores = torch.einsum("td,hrd->thr", xn, m.to(x.dtype).to(acc))
        probs = scores.softmax(dim=-1)
        out = torch.einsum("thr,hrd->td", probs, u.to(x.dtype).to(acc))
    return (xa + out).to(x.dtype)


def geglu(a: torch.Tensor) -> torch.Tensor:
    """NV-Embed's GEGLU on the last dim [..., 2F] -> [..., F]: ``v * gelu(g)``, exact (erf) gelu,
    v the first half and g the second half. Computed in a's dtype."""
    v, g = a.chunk(2, dim=-1)
    return v * F.gelu(g)


def geglu_segment_mean_ref(a: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean of ``geglu(a)`` over packed rows.

    a [T, 2F]; cu_seqlens [B+1] int32 (sequence b is rows cu_seqlens[b]:cu_seqlens[b+1]).
    Returns [B, F] in a's dtype, accumulated in float32. An empty sequence gives zeros.
    """
    acc = _acc_dtype(a.dtype)
    act = geglu(a.to(acc))
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    batch = lengths.shape[0]
    # output_size avoids a host sync; index_add is differentiable w.r.t. the rows.
    seq_of_row = torch.repeat_interleave(torch.arange(batch, device=a.device), lengths, output_size=a.shape[0])
    total = act.new_zeros(batch, act.shape[1]).index_add(0, seq_of_row, act)
    return (total / lengths.to(acc)[:, None].clamp_min(1)).to(a.dtype)
