"""NV-Embed-v2's latent-attention pooling block as published, unfolded: the spec.

:class:`UnfoldedLatentAttentionPooling` performs exactly the computation of the public
``LatentAttentionModel`` (nvidia/NV-Embed-v2, modeling_nvembed.py): every position of every
sequence goes through a pre-norm cross-attention (tokens are the queries, the learned latents
the keys and values, re-projected for every batch element) and a pre-norm GEGLU feed-forward,
both residual; then a masked mean and an L2 normalisation. It is the specification that the fast
:class:`~latentembed.modules.latent_attention.LatentAttentionPooling` is tested against, and it
shares its parameters (:class:`LatentAttentionParameters`), so one state dict loads into both.

Our two deliberate differences from the public code: a sequence with nothing to pool gives zeros
(the public code divides by zero and returns NaN), and the result is cast to the input's dtype
(the public code returns float32 because it multiplies by a float mask). The mean accumulates in
float32 as the public code does.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .pooling_functions import check_pool_inputs, l2_normalize

__all__ = [
    "LatentAttentionParameters",
    "NVEMBED_PREFIX",
    "UnfoldedLatentAttentionPooling",
    "strip_prefix",
]

# Prefix of the pooling block's tensors in NV-Embed-v2's checkpoint (the one definition: the
# checkpoint reader of latentembed.models.embedding_io uses it too).
NVEMBED_PREFIX = "latent_attention_model."


class _PreNorm(nn.Module):
    """LayerNorm on the input (``norm``) and, for cross-attention, on the context
    (``norm_context``), then ``fn``. Named as in NV-Embed-v2's checkpoint."""

    def __init__(self, dim: int, fn: nn.Module, context_dim: Optional[int] = None):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if context_dim is not None else None

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.norm_context is None:
            return self.fn(self.norm(x))
        return self.fn(self.norm(x), self.norm_context(context))


class _CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` [B, N, D] over ``context`` [B, R, Dc], no bias,
    heads split as (h d) with h outermost, plain softmax(q k^T / sqrt(dim_head)) v."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        def heads_first(t: torch.Tensor) -> torch.Tensor:  # [B, N, h*d] -> [B, h, N, d]
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q = heads_first(self.to_q(x))
        k, v = map(heads_first, self.to_kv(context).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(dim_head)
        return self.to_out(out.transpose(1, 2).flatten(2))


class _GEGLU(nn.Module):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        value, gate = a.chunk(2, dim=-1)
        return value * F.gelu(gate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 2 * mult * dim), _GEGLU(), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = NVEMBED_PREFIX) -> dict:
    """The entries of ``state_dict`` whose key starts with ``prefix``, with the prefix removed.

    Example:
        >>> full = {"latent_attention_model.latents": torch.zeros(2, 3), "embedding_model.x": torch.zeros(1)}
        >>> list(strip_prefix(full))
        ['latents']
    """
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


class LatentAttentionParameters(nn.Module):
    """The parameters of NV-Embed's latent-attention block, with the checkpoint's names.

    ``hidden_size`` D is the token hidden size (queries, residual stream, output);
    ``latent_dim`` the width of the latent array (keys/values source; NV-Embed-v2 uses D).
    Keys and shapes (inner = num_heads * dim_head, F = ff_mult * D)::

        latents                                   [num_latents, latent_dim]
        cross_attend_blocks.0.norm.{weight,bias}  [D]
        cross_attend_blocks.0.norm_context.{weight,bias}  [latent_dim]
        cross_attend_blocks.0.fn.to_q.weight      [inner, D]
        cross_attend_blocks.0.fn.to_kv.weight     [2 * inner, latent_dim]  (K rows, then V rows)
        cross_attend_blocks.0.fn.to_out.weight    [D, inner]
        cross_attend_blocks.1.norm.{weight,bias}  [D]
        cross_attend_blocks.1.fn.net.0.{weight,bias}  [2F, D], [2F]  (value half, then gate half)
        cross_attend_blocks.1.fn.net.2.{weight,bias}  [D, F], [D]

    Initialisation as the public model: latents standard normal, PyTorch's Linear and LayerNorm
    defaults. ``load_state_dict`` checks every shape first and names each mismatch with the
    config field that fixes it.
    """

    def __init__(
        self,
        hidden_size: int = 4096,
        num_latents: int = 512,
        num_heads: int = 8,
        dim_head: int = 4096,
        ff_mult: int = 4,
        normalize: bool = True,
        latent_dim: Optional[int] = None,
    ):
        super().__init__()
        latent_dim = hidden_size if latent_dim is None else latent_dim
        for name, value in (
            ("hidden_size", hidden_size),
            ("num_latents", num_latents),
            ("num_heads", num_heads),
            ("dim_head", dim_head),
            ("ff_mult", ff_mult),
            ("latent_dim", latent_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.hidden_size, self.num_latents, self.latent_dim = hidden_size, num_latents, latent_dim
        self.num_heads, self.dim_head, self.ff_mult = num_heads, dim_head, ff_mult
        self.normalize = bool(normalize)
        self.cross_attend_blocks = nn.ModuleList(
            [
                _PreNorm(hidden_size, _CrossAttention(hidden_size, latent_dim, num_heads, dim_head), latent_dim),
                _PreNorm(hidden_size, _FeedForward(hidden_size, ff_mult)),
            ]
        )
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim))

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_latents={self.num_latents}, "
            f"num_heads={self.num_heads}, dim_head={self.dim_head}, ff_mult={self.ff_mult}, "
            f"latent_dim={self.latent_dim}, normalize={self.normalize}"
        )

    def _shape_hints(self) -> dict:
        return {
            "latents": "[num_latents, latent_dim]",
            "cross_attend_blocks.0.norm": "[hidden_size]",
            "cross_attend_blocks.0.norm_context": "[latent_dim]",
            "cross_attend_blocks.0.fn.to_q": "[num_heads * dim_head, hidden_size]",
            "cross_attend_blocks.0.fn.to_kv": "[2 * num_heads * dim_head, latent_dim]",
            "cross_attend_blocks.0.fn.to_out": "[hidden_size, num_heads * dim_head]",
            "cross_attend_blocks.1.norm": "[hidden_size]",
            "cross_attend_blocks.1.fn.net.0": (
                "[2 * ff_mult * hidden_size, hidden_size] (bias [2 * ff_mult * hidden_size])"
            ),
            "cross_attend_blocks.1.fn.net.2": "[hidden_size, ff_mult * hidden_size] (bias [hidden_size])",
        }

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        *,
        num_heads: int = 8,
        normalize: bool = True,
        prefix: str = "",
        **kwargs,
    ):
        """Build the module with the sizes read off ``state_dict`` (keys after ``prefix``) and
        load it. ``num_heads`` cannot be read off the shapes (only num_heads * dim_head can).

        Example:
            >>> small = LatentAttentionParameters(hidden_size=16, num_latents=4, num_heads=2, dim_head=8)
            >>> LatentAttentionParameters.from_state_dict(small.state_dict(), num_heads=2).dim_head
            8
        """
        sd = strip_prefix(state_dict, prefix) if prefix else dict(state_dict)
        try:
            num_latents, latent_dim = sd["latents"].shape
            inner, hidden_size = sd["cross_attend_blocks.0.fn.to_q.weight"].shape
            two_f = sd["cross_attend_blocks.1.fn.net.0.weight"].shape[0]
        except KeyError as e:
            raise ValueError(f"state dict has no {e.args[0]!r} entry (after prefix {prefix!r})") from None
        if inner % num_heads or two_f % (2 * hidden_size):
            raise ValueError(
                f"to_q's {inner} rows are not divisible by num_heads={num_heads}, or net.0's {two_f} "
                f"rows are not a multiple of 2 * hidden_size = {2 * hidden_size}"
            )
        # On the meta device: no random init of weights that are overwritten at once.
        with torch.device("meta"):
            module = cls(
                hidden_size=hidden_size,
                num_latents=num_latents,
                num_heads=num_heads,
                dim_head=inner // num_heads,
                ff_mult=two_f // (2 * hidden_size),
                normalize=normalize,
                latent_dim=latent_dim,
                **kwargs,
            )
        module.load_state_dict(sd, assign=True)
        return module

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` with a shape check first and a hint for prefixed keys.

        Keys are the checkpoint's without ``NVEMBED_PREFIX``; use :func:`strip_prefix`
        on a full NV-Embed-v2 state dict. A shape mismatch raises ``ValueError`` listing every
        mismatched key with the expected shape, the received one and the config fields behind it.
        """
        own = self.state_dict(keep_vars=True)
        hints = self._shape_hints()
        problems = []
        for key, value in state_dict.items():
            if key in own and isinstance(value, torch.Tensor) and value.shape != own[key].shape:
                hint = hints.get(key.rsplit(".", 1)[0] if key != "latents" else key, "")
                problems.append(f"  {key}: expected {tuple(own[key].shape)} {hint}, got {tuple(value.shape)}")
        if problems:
            raise ValueError(
                f"state dict does not fit {type(self).__name__}({self.extra_repr()}):\n"
                + "\n".join(problems)
                + "\nbuild the module with the checkpoint's configuration"
            )
        if strict and state_dict and not any(k in own for k in state_dict):
            prefixed = [k for k in state_dict if NVEMBED_PREFIX in k]
            if prefixed:
                raise ValueError(
                    f"no key of the state dict matches {type(self).__name__}'s; keys such as "
                    f"{prefixed[0]!r} carry a prefix: load strip_prefix(state_dict) "
                    f"(from latentembed.modules.latent_attention_unfolded)"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def check_inputs(
        self,
        hidden: torch.Tensor,
        pool_mask: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        *,
        validate: bool = True,
    ) -> None:
        """Check a forward's arguments: pool()'s rules (hidden padded [B, L, D] or packed [T, D]
        with ``cu_seqlens`` [B+1], the pool mask of that layout; see
        :func:`~latentembed.modules.pooling_functions.check_pool_inputs`) and D = ``hidden_size``.
        ``validate`` reads cu_seqlens' values (one host sync)."""
        check_pool_inputs(hidden, pool_mask, cu_seqlens, validate=validate)
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden has {hidden.shape[-1]} features (last dim of shape {tuple(hidden.shape)}) "
                f"but the module was built with hidden_size={self.hidden_size}"
            )


class UnfoldedLatentAttentionPooling(LatentAttentionParameters):
    """The public NV-Embed-v2 pooling block, unfolded: the spec (slow; for tests and baselines).

    Args: as :class:`LatentAttentionParameters`.

    Forward: ``hidden`` [B, L, D], ``pool_mask`` [B, L] (nonzero = pool; ``None`` pools every
    position) -> [B, D] in hidden's dtype. Every position goes through the block, padding too.

    Example:
        >>> ref = UnfoldedLatentAttentionPooling(hidden_size=32, num_latents=4, num_heads=2, dim_head=8)
        >>> ref(torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)).shape
        torch.Size([2, 32])
    """

    def forward(self, hidden: torch.Tensor, pool_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.check_inputs(hidden, pool_mask)
        cross_attn, cross_ff = self.cross_attend_blocks
        # The public code repeats the latents for every batch element (and projects each copy).
        latents = self.latents.unsqueeze(0).expand(hidden.shape[0], -1, -1)
        h = cross_attn(hidden, latents) + hidden
        h = cross_ff(h) + h
        if pool_mask is None:
            pool_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        keep = (pool_mask != 0).unsqueeze(-1)
        acc = torch.promote_types(h.dtype, torch.float32)
        total = torch.where(keep, h, 0).sum(1, dtype=acc)
        count = keep.sum(1).to(acc)
        # Our rule for a sequence with nothing to pool: zeros (the public code gives NaN).
        pooled = total / count.clamp_min(1)
        if self.normalize:
            # F.normalize's rounding; a zero row (nothing pooled) stays zero with zero gradient.
            pooled = l2_normalize(pooled)
        return pooled.to(hidden.dtype)
