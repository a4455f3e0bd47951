"""Grouped-query self-attention with rotary embeddings and pluggable attention backends.

Layouts (see :class:`AttentionInputs`): padded tokens [B, L, D] with a boolean mask, or packed
tokens [T, D] with int32 ``cu_seqlens`` [B+1]. Backends:

- ``flash``: flash-attn's ``flash_attn_varlen_func`` (packed, CUDA, fp16/bf16, if installed);
- ``varlen``: torch's ``torch.nn.attention.varlen.varlen_attn`` (packed, CUDA, fp16/bf16);
- ``sdpa``: ``F.scaled_dot_product_attention``. Padded input: a dense boolean [B, 1, *, L]
  mask. Packed input: one call per sequence over its own rows (``AttentionInputs.seqlens``, host
  ints), so no position attends across sequences and nothing is computed or stored for
  padding, on any device and dtype (the packed path where flash / varlen cannot run, e.g. on
  CPU). Under ``torch.compile`` a packed batch falls back to a block-diagonal [T, T] mask, which
  does not specialise the graph on the lengths;
- ``math``: the reference, plain PyTorch in fp32 with a dense mask (block-diagonal [T, T] when
  packed; any device/dtype).

Dense masks never leave a query row with no key: padding queries may always see themselves
(and an all-padding row sees every key), so no NaN appears anywhere; real queries never see
padding keys, so padding rows cannot influence real tokens.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.dispatch import Backend, BackendUnavailableError
from .rotary import apply_rotary

ATTENTION_BACKENDS = ("flash", "varlen", "sdpa", "math")
PACKED_ONLY = frozenset({"flash", "varlen"})
_HALF = frozenset({torch.float16, torch.bfloat16})
_ALL = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _flash_unavailable() -> Optional[str]:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash-attn is not installed"
    return None


def _varlen_unavailable() -> Optional[str]:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    return None


def _needs_packed(packed: bool) -> Optional[str]:
    return None if packed else "needs packed input (cu_seqlens); padded input is unpadded first"


_BACKENDS = (
    Backend("flash", frozenset({"cuda"}), _HALF, frozenset({"cuda"}), _flash_unavailable, _needs_packed),
    Backend("varlen", frozenset({"cuda"}), _HALF, frozenset({"cuda"}), _varlen_unavailable, _needs_packed),
    Backend("sdpa", frozenset({"cpu", "cuda"}), _ALL, frozenset({"cpu", "cuda"})),
    Backend("math", frozenset({"cpu", "cuda"}), _ALL, frozenset({"cpu", "cuda"})),
)


def select_attention_backend(backend: str, device: torch.device, dtype: torch.dtype, packed: bool) -> str:
    """Name of the attention backend to use, or raise :class:`BackendUnavailableError` with
    every reason. ``backend="auto"`` takes the first of flash, varlen, sdpa that can run."""
    if backend != "auto" and backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be 'auto' or one of {ATTENTION_BACKENDS}, got {backend!r}")
    reasons = []
    for spec in _BACKENDS:
        if backend not in ("auto", spec.name):
            continue
        if backend == "auto" and device.type not in spec.auto_devices:
            continue
        reason = spec.why_not(device, dtype, packed)
        if reason is None:
            return spec.name
        reasons.append(f"{spec.name}: {reason}")
    raise BackendUnavailableError(
        f"attention: no backend can run with backend={backend!r} on '{device.type}', "
        f"dtype {str(dtype).replace('torch.', '')}, {'packed' if packed else 'padded'} input:\n  "
        + "\n  ".join(reasons)
    )


def packed_backend_available(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """The first packed-only backend (flash, varlen) usable here, or ``None``."""
    for spec in _BACKENDS:
        if spec.name in PACKED_ONLY and spec.why_not(device, dtype, True) is None:
            return spec.name
    return None


def packed_runs_lean(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packed input costs nothing for padding with ``backend`` (``"auto"`` or a name):
    true for flash, varlen and sdpa (one call per sequence), false for ``math``, whose dense
    block-diagonal [T, T] mask grows with the square of the whole batch's tokens."""
    try:
        return select_attention_backend(backend, device, dtype, packed=True) != "math"
    except BackendUnavailableError:
        return False


def dense_padding_mask(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean keep-mask [B, 1, 1 or L, L] for padded input; ``attention_mask`` [B, L] (1 = real).

    Queries see the real keys (and, if causal, only earlier ones). Every padding query may see
    itself and an all-padding row sees all keys: no row is empty, hence no NaN."""
    keep = attention_mask.bool()
    keep = keep | ~keep.any(-1, keepdim=True)
    keep = keep[:, None, None, :]
    if not causal:
        return keep
    L = attention_mask.shape[-1]
    idx = torch.arange(L, device=attention_mask.device)
    return (keep & (idx[None, :] <= idx[:, None])) | (idx[None, :] == idx[:, None])


def dense_packed_mask(cu_seqlens: torch.Tensor, total: int, causal: bool) -> torch.Tensor:
    """Block-diagonal keep-mask [1, 1, T, T] for packed input (each token sees its sequence)."""
    rows = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), rows, right=True)
    keep = seq[:, None] == seq[None, :]
    if causal:
        keep = keep & (rows[None, :] <= rows[:, None])
    return keep[None, None]


@dataclass
class AttentionInputs:
    """Per-forward attention metadata shared by every layer (built once by the model).

    Attributes:
        backend: one of :data:`ATTENTION_BACKENDS` (already selected).
        causal: causal attention within each sequence.
        dense_mask: bool keep-mask for ``math`` ([B, 1, *, L] padded or [1, 1, T, T] packed)
            and padded ``sdpa``.
        cu_seqlens: int32 [B+1] for packed input (``None`` when padded).
        max_seqlen: longest sequence (a Python int, for the varlen kernels).
        seqlens: the B sequence lengths as host ints, for packed ``sdpa`` (one call per
            sequence); see :func:`host_seqlens`.
    """

    backend: str
    causal: bool = False
    dense_mask: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0
    seqlens: Optional[tuple] = None


def host_seqlens(cu_seqlens: torch.Tensor) -> tuple:
    """The B lengths of ``cu_seqlens`` [B+1] as a tuple of Python ints (one host read)."""
    return tuple((cu_seqlens[1:] - cu_seqlens[:-1]).tolist())


def _attention_math(q, k, v, mask, scale):
    """Reference: q [N, H, Lq, d], k/v [N, Hkv, Lk, d] -> [N, H, Lq, d], in fp32 (fp64 for fp64)."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    wide = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(wide), k.to(wide).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.to(wide)).to(q.dtype)


def _varlen_parameters() -> frozenset:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


# Read once at import: inspecting a signature inside a compiled region would break the graph.
# Only where the backend can run (CUDA): importing torch.nn.attention.varlen pulls in
# torch._dynamo, about 2 s, which CPU-only users of the package should not pay on import.
_VARLEN_PARAMS = _varlen_parameters() if torch.cuda.is_available() else frozenset()


def _varlen_kwargs(causal: bool, gqa: bool) -> dict:
    params = _VARLEN_PARAMS
    kwargs = {}
    if causal:
        # torch 2.11+ spells causal as a window (-1, 0); some releases had is_causal.
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0)
        else:
            kwargs["is_causal"] = True
    # torch 2.11 lacks enable_gqa but already accepts fewer KV heads.
    if gqa and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return kwargs


def _sdpa_per_sequence(q, k, v, seqlens: tuple, causal: bool, scale: float) -> torch.Tensor:
    """Packed attention without a varlen kernel: q [T, H, d], k/v [T, Hkv, d] -> [T, H, d],
    one SDPA call per sequence on views of its rows.

    ``split`` gives views (no copy) and its backward is one ``cat``; the output's ``cat`` is the
    only copy. Nothing is computed, masked or saved for padding, and each call takes the fused
    kernel of its device (on CPU the flash kernel: it saves the output and the log-sum-exp, not
    the [H, n, n] probabilities). Empty sequences are skipped (their rows do not exist)."""
    gqa = k.shape[1] != q.shape[1]
    outs = []
    for qs, ks, vs in zip(q.split(seqlens), k.split(seqlens), v.split(seqlens)):
        if qs.shape[0] == 0:
            continue
        o = F.scaled_dot_product_attention(
            qs.transpose(0, 1).unsqueeze(0),
            ks.transpose(0, 1).unsqueeze(0),
            vs.transpose(0, 1).unsqueeze(0),
            is_causal=causal,
            scale=scale,
            enable_gqa=gqa,
        )
        outs.append(o[0].transpose(0, 1))
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
    """Attention over rotated heads: q [..., N, H, d], k/v [..., N, Hkv, d] -> [..., N, H, d].

    ``...`` is B for padded input and absent for packed input.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if inputs.backend == "flash":
        from flash_attn import flash_attn_varlen_func

        cu, n = inputs.cu_seqlens, inputs.max_seqlen
        return flash_attn_varlen_func(q, k, v, cu, cu, n, n, softmax_scale=scale, causal=inputs.causal)
    if inputs.backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        cu, n = inputs.cu_seqlens, inputs.max_seqlen
        kwargs = _varlen_kwargs(inputs.causal, k.shape[-2] != q.shape[-2])
        return varlen_attn(q, k, v, cu, cu, n, n, scale=scale, **kwargs)
    packed = q.ndim == 3
    mask = inputs.dense_mask
    if packed and inputs.backend == "sdpa":
        if inputs.seqlens is not None and not torch.compiler.is_compiling():
            return _sdpa_per_sequence(q, k, v, inputs.seqlens, inputs.causal, scale)
        if mask is None:
            mask = dense_packed_mask(inputs.cu_seqlens, q.shape[0], inputs.causal)
    if packed:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [N, H, L, d]
    if inputs.backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    else:
        out = _attention_math(q, k, v, mask, scale)
    out = out.transpose(1, 2)
    return out.squeeze(0) if packed else out


class GroupedQueryAttention(nn.Module):
    """Self-attention with ``num_heads`` query heads sharing ``num_kv_heads`` key/value heads.

    The projections are separate ``nn.Linear`` attributes with the Hugging Face names
    (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) so adapters can replace them by name.

    Shapes: ``x`` [B, L, D] (padded) or [T, D] (packed); ``cos``/``sin`` [B, L, d] or [T, d]
    -> same shape as ``x``.

    Example:
        >>> attn = GroupedQueryAttention(64, 4, 2, 16)
        >>> x = torch.randn(10, 64)
        >>> cos, sin = torch.ones(10, 16), torch.zeros(10, 16)
        >>> cu = torch.tensor([0, 4, 10], dtype=torch.int32)
        >>> inputs = AttentionInputs("math", dense_mask=dense_packed_mask(cu, 10, False), cu_seqlens=cu)
        >>> attn(x, cos, sin, inputs).shape
        torch.Size([10, 64])
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        o_bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(q, k, v, inputs)
        return self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim))
