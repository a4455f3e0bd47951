"""NV-Embed latent-attention pooling, computed on pooled tokens only with both projections folded.

Same parameters (names, shapes, init) and same result as the public block
(:class:`~latentembed.modules.latent_attention_unfolded.UnfoldedLatentAttentionPooling`), with
the algebra derived step by step in docs/ops/latent_attention.md ("Derivation: what the fast
module may skip"):

* the block is token-wise, so only the rows inside the pool mask are computed (packed);
* K and V of the latents depend on weights only: projected once per call, not per sequence;
* per head, scores = LN(x) M_h^T with M_h = K_h Wq_h / sqrt(dim_head) and the attention output
  is P_h U_h with U_h = V_h Wo_h^T, so the cross-attention is two GEMMs of width heads*latents;
* the feed-forward's second Linear commutes with the mean: W2 mean_t(geglu_t) + b2, once per
  sequence.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..ops import checks
from ..ops.latent_attention import geglu_segment_mean, latent_cross_attention
from ..ops.masked_mean import masked_mean_pool
from .latent_attention_unfolded import LatentAttentionParameters
from .pooling_functions import l2_normalize, pack_pool_rows

__all__ = ["LatentAttentionPooling"]


def _compiler_disabled(fn: Callable) -> Callable:
    """``torch.compiler.disable(fn)``, built at the first call: building it imports
    torch._dynamo (about 0.9 s on CPU), which ``import latentembed`` must not pay. The cache read
    and write stay outside compiled graphs either way (a call traced by dynamo runs the disabled
    function eagerly, as the decorator did)."""
    disabled: list = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return wrapper


class LatentAttentionPooling(LatentAttentionParameters):
    """NV-Embed-v2's latent-attention pooling, fast: loads the same state dict as the public block.

    Args:
        hidden_size: D, the token hidden size (4096).
        num_latents: R, rows of the learned latent array (512).
        num_heads: H (8).  dim_head: per-head width of q/k/v (4096).
        ff_mult: the feed-forward's width F = ff_mult * D (4).
        normalize: L2-normalise the pooled vectors (True).
        latent_dim: width of the latents (default: hidden_size).
        backend: backend of the fused ops (``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"``).

    Forward:
        ``hidden`` padded [B, L, D] with ``pool_mask`` [B, L], or packed [T, D] with
        ``cu_seqlens`` [B+1] int32 and optionally ``pool_mask`` [T]; nonzero = pooled, ``None``
        pools every row. Tokens outside the pool mask (padding, instruction tokens) are never
        computed. Returns [B, D] in hidden's dtype; a sequence with nothing to pool gives zeros.

    Dtypes: without autocast, hidden and the parameters must share a dtype (fp32, fp16, bf16 or
    fp64), the compute dtype. Under autocast on hidden's device, the compute dtype is autocast's;
    the residual stream keeps ``promote_types(hidden.dtype, compute dtype)``, as in the public
    block (whose attention output, in the autocast dtype, is added to the unrounded hidden):
    float32 hidden under bf16 autocast keeps a float32 residual. In the compute dtype: the fold
    (K, V, M, U), the score and output GEMMs, LN2's output, the first feed-forward Linear and the
    per-sequence W2. In float32 (at least): LayerNorm statistics, the whole of LN2 (forward and
    backward), scores and softmax, the GEGLU mean, the mean of the residual stream, the final sum
    and the normalisation. The result has
    hidden's dtype. When the residual dtype is the compute dtype (no autocast, or hidden already
    in the autocast dtype) the cross-attention is the fused op; otherwise it runs as two GEMMs in
    plain PyTorch (the fused op writes its output, residual included, in one dtype).

    Folded matrices M, U [H, R, D] (the "folded weights" are latents, norm_context, to_kv, to_q
    and to_out):

    * training mode (``module.train()``), grad enabled and any folded weight requiring grad: M and
      U are rebuilt from the weights on every call, autograd runs through the fold, no cache is
      kept (the weights change every step);
    * every other case (eval mode; ``no_grad``/``inference_mode``; frozen folded weights): M and U
      come from a cache, rebuilt only when a folded weight changes. In eval mode with grad enabled
      and trainable folded weights the cached M, U still carry exact gradients to the folded
      weights: the backward recomputes K and V from the weights (not M and U), so an eval-mode
      forward costs no fold and an eval-mode forward+backward costs no more than a training one.

    The cache is keyed on the folded weights themselves (weak references: replacing a parameter
    or ``torch.func.functional_call`` misses it), their in-place version counters, dtype and
    device, and on the compute dtype: an optimizer step, ``load_state_dict`` or ``.to()``
    invalidates it. Writes through ``param.data`` bypass version counting: call
    :meth:`invalidate_cache` after those.

    Example:
        >>> pool = LatentAttentionPooling(hidden_size=32, num_latents=4, num_heads=2, dim_head=8)
        >>> h = torch.randn(2, 5, 32)
        >>> pool(h, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])).shape
        torch.Size([2, 32])
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
        backend: str = "auto",
    ):
        super().__init__(hidden_size, num_latents, num_heads, dim_head, ff_mult, normalize, latent_dim)
        self.backend = backend
        self._fold_cache: Optional[tuple] = None

    # -- the fold ---------------------------------------------------------------------------
    def _fold_params(self) -> tuple:
        attn = self.cross_attend_blocks[0]
        return (
            self.latents,
            attn.norm_context.weight,
            attn.norm_context.bias,
            attn.fn.to_kv.weight,
            attn.fn.to_q.weight,
            attn.fn.to_out.weight,
        )

    def _fold_factors(self, params: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple:
        """``(K_h / sqrt(dim_head), V_h, Wq_h, Wo_h^T)`` per head, each [H, ., .], in ``dtype``, from
        the folded weights ``params`` (in :meth:`_fold_params` order)."""
        latents, ctx_weight, ctx_bias, wkv, wq, wo = params
        H, dh, R, D = self.num_heads, self.dim_head, self.num_latents, self.hidden_size
        eps = self.cross_attend_blocks[0].norm_context.eps
        # LayerNorm in the parameters' precision (autocast would run it in float32 too).
        lat = F.layer_norm(latents, (self.latent_dim,), ctx_weight, ctx_bias, eps)
        kv = F.linear(lat.to(dtype), wkv.to(dtype))  # [R, 2*H*dh], K then V
        k, v = kv.view(R, 2, H, dh).permute(1, 2, 0, 3).unbind(0)  # each [H, R, dh]
        wq_h = wq.to(dtype).view(H, dh, D)
        wo_t = wo.to(dtype).view(D, H, dh).permute(1, 2, 0)  # [H, dh, D]
        return k * dh**-0.5, v, wq_h, wo_t

    def fold(self, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded per-head matrices ``(M, U)``, each [H, R, D], in ``dtype``.

        ``M[h] = K_h Wq_h / sqrt(dim_head)`` and ``U[h] = V_h Wo_h^T`` with ``[K, V] =
        LN_context(latents) Wkv^T``: K and V are projected once. Differentiable (autograd reaches
        latents, norm_context, to_kv, to_q and to_out). ``dtype`` defaults to the parameters'.
        """
        dtype = self.latents.dtype if dtype is None else dtype
        k, v, wq, wo_t = self._fold_factors(self._fold_params(), dtype)
        return torch.bmm(k, wq), torch.bmm(v, wo_t)

    def invalidate_cache(self) -> None:
        """Drop the cached folded matrices (needed only after writes through ``param.data``)."""
        self._fold_cache = None

    @_compiler_disabled
    def _cached_fold(self, dtype: torch.dtype, differentiable: bool) -> tuple[torch.Tensor, torch.Tensor]:
        params = self._fold_params()
        key = (dtype, torch.is_inference_mode_enabled(), tuple((p._version, p.dtype, p.device) for p in params))
        cache = self._fold_cache
        # Weak references, not data pointers: a new tensor can reuse a freed one's memory with
        # version 0 (functional_call, replaced parameters), and the cache must not keep old
        # weights alive.
        if cache is None or cache[0] != key or any(ref() is not p for ref, p in zip(cache[1], params)):
            with torch.no_grad():
                m, u = self.fold(dtype)
            cache = self._fold_cache = (key, tuple(weakref.ref(p) for p in params), m, u)
        m, u = cache[2], cache[3]
        if differentiable:
            return _CachedFoldFunction.apply(self, dtype, m, u, *params)
        return m, u

    def _folded(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in self._fold_params())
        if trainable and self.training:
            if self._fold_cache is not None:
                self._fold_cache = None  # stale as soon as the optimizer steps; free the memory
            return self.fold(dtype)
        return self._cached_fold(dtype, differentiable=trainable)

    def _apply(self, fn, *args, **kwargs):
        self._fold_cache = None
        return super()._apply(fn, *args, **kwargs)

    # -- forward ----------------------------------------------------------------------------
    def _compute_dtype(self, hidden: torch.Tensor) -> torch.dtype:
        device_type = hidden.device.type
        if hidden.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        param_dtype = self.latents.dtype
        if hidden.dtype != param_dtype:
            raise TypeError(
                f"hidden has dtype {checks.dtype_name(hidden.dtype)} but the module's parameters are "
                f"{checks.dtype_name(param_dtype)}: convert one of them (e.g. module.to(hidden.dtype)) "
                "or run under torch.autocast"
            )
        return hidden.dtype

    def forward(
        self,
        hidden: torch.Tensor,
        pool_mask: Optional[torch.Tensor] = None,
        *,
        cu_seqlens: Optional[torch.Tensor] = None,
        validate: bool = True,
        num_pooled: Optional[int] = None,
    ) -> torch.Tensor:
        """Pool ``hidden`` (see the class docstring). ``validate`` checks cu_seqlens' values.

        ``num_pooled``: the number of nonzero ``pool_mask`` entries, when the caller knows it
        (a tokenizer's masks are on the host): the pooled rows are then gathered without a
        device-to-host sync. With ``validate`` the count is checked (one host read, as
        without it); ``validate=False`` trusts it and reads nothing back."""
        self.check_inputs(hidden, pool_mask, cu_seqlens, validate=validate)
        if self.latents.device != hidden.device:
            raise ValueError(f"hidden is on {hidden.device} but the module's parameters are on {self.latents.device}")
        cdt = self._compute_dtype(hidden)
        acc = torch.promote_types(cdt, torch.float32)
        # The public block adds its attention output (compute dtype) to hidden: the residual
        # stream has the promoted dtype (float32 for float32 hidden under bf16 autocast).
        res_dtype = torch.promote_types(hidden.dtype, cdt)
        backend = self.backend
        if num_pooled is not None and validate and pool_mask is not None and not torch.compiler.is_compiling():
            actual = int((pool_mask != 0).sum())
            if actual != num_pooled:
                raise ValueError(
                    f"num_pooled must be the number of nonzero pool_mask entries, {actual}, got {num_pooled}"
                )
        rows, cu = pack_pool_rows(hidden, pool_mask, cu_seqlens, total=num_pooled)
        pooled_any = (cu[1:] > cu[:-1])[:, None]  # [B, 1]: False for a sequence with nothing pooled

        attn_block, ff_block = self.cross_attend_blocks
        net = ff_block.fn.net
        # Dtypes are explicit below; autocast would otherwise re-cast inside the ops.
        with torch.autocast(hidden.device.type, enabled=False):
            m, u = self._folded(cdt)
            ln1 = attn_block.norm
            if res_dtype == cdt:
                y = latent_cross_attention(
                    rows.to(cdt), ln1.weight, ln1.bias, m, u, eps=ln1.eps, backend=backend, validate=False
                )  # [T', D]
            else:
                y = self._cross_attention_wide_residual(rows.to(res_dtype), m, u, cdt)
            ln2 = ff_block.norm
            # LN2 in float32 (at least), as autocast runs the public block's: its weight gradient
            # is a sum over tokens that cancels, and half-precision LN made it up to 2x less
            # accurate than the public block's (200 random draws under bf16 autocast). With
            # float32 weight and bias, layer_norm reads half-precision y as it is, computes in
            # float32 and writes its output once in y's dtype (its backward likewise), which is
            # what a float32 LN of a float32 copy of y followed by a cast gives, without the
            # two [T', D] float32 copies.
            z = F.layer_norm(y, (self.hidden_size,), ln2.weight.to(acc), ln2.bias.to(acc), ln2.eps)
            a = F.linear(z.to(cdt), net[0].weight.to(cdt), net[0].bias.to(cdt))  # [T', 2F]
            act_mean = geglu_segment_mean(a, cu, backend=backend, validate=False)  # [B, F]
            # The residual stream's mean in float32: rounding it once to a half dtype would be
            # an error the public block does not make (it sums its half rows in float32). The
            # op writes the float32 mean of the half rows directly; its CUDA kernels do not take
            # out_dtype, so that backend keeps a float32 copy.
            if backend == "cuda":
                y_mean = masked_mean_pool(y.to(acc), cu_seqlens=cu, backend=backend, validate=False)
            else:
                y_mean = masked_mean_pool(y, cu_seqlens=cu, backend=backend, validate=False, out_dtype=acc)  # [B, D]
            # mean_t(y_t + W2 g_t + b2) = mean_t(y_t) + W2 mean_t(g_t) + b2, for pooled-to sequences.
            ff_mean = F.linear(act_mean, net[2].weight.to(cdt))
            pooled = y_mean.to(acc) + ff_mean.to(acc) + net[2].bias.to(acc)
            # A sequence with nothing pooled is zero and sends exactly zero gradient back: any
            # gradient reaching its row (F.normalize's g / 1e-12 at a zero row, inf in fp16)
            # would meet its zero GEGLU mean in W2's gradient and make 0 * inf = NaN.
            pooled = torch.where(pooled_any, pooled, 0.0)
            if self.normalize:
                pooled = l2_normalize(pooled)
        return pooled.to(hidden.dtype)

    def _cross_attention_wide_residual(
        self, x: torch.Tensor, m: torch.Tensor, u: torch.Tensor, cdt: torch.dtype
    ) -> torch.Tensor:
        """``x + sum_h softmax(LN(x) M_h^T) U_h`` for rows x [T', D] wider than the compute dtype
        ``cdt`` (autocast): LayerNorm and softmax in float32, both GEMMs in cdt, the residual added
        in x's dtype, as the public block does under autocast."""
        ln = self.cross_attend_blocks[0].norm
        H, R, D = m.shape
        acc = torch.promote_types(x.dtype, torch.float32)
        xn = F.layer_norm(x.to(acc), (D,), ln.weight.to(acc), ln.bias.to(acc), ln.eps)
        scores = F.linear(xn.to(cdt), m.reshape(H * R, D))  # [T', H*R]
        probs = scores.view(-1, H, R).to(acc).softmax(-1).to(cdt)
        attn = probs.view(-1, H * R) @ u.reshape(H * R, D)  # [T', D] in cdt
        return x + attn.to(x.dtype)


class _CachedFoldFunction(torch.autograd.Function):
    """Cached ``(M, U)`` as a differentiable function of the folded weights.

    ``forward(module, dtype, m, u, *params)`` returns the cached m, u (no fold); the backward
    recomputes K, V, Wq_h, Wo_h^T from ``params`` (not M and U), takes the gradients of the two
    per-head products by hand and back-propagates them through that recomputation. ``params``
    are saved, so an in-place update between forward and backward raises instead of giving
    gradients of other weights.
    """

    @staticmethod
    def forward(ctx, module, dtype, m, u, *params):
        ctx.module, ctx.dtype = module, dtype
        ctx.save_for_backward(*params)
        # Fresh aliases: autograd attaches its graph to them, not to the cached tensors.
        return m.view_as(m), u.view_as(u)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_m, grad_u):
        params = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(need) for p, need in zip(params, needs)]
            k, v, wq, wo_t = ctx.module._fold_factors(leaves, ctx.dtype)
            # M = K Wq and U = V Wo^T per head (bmm): their gradients with respect to the factors.
            factor_grads = (
                torch.bmm(grad_m, wq.detach().mT),
                torch.bmm(grad_u, wo_t.detach().mT),
                torch.bmm(k.detach().mT, grad_m),
                torch.bmm(v.detach().mT, grad_u),
            )
            pairs = [(f, g) for f, g in zip((k, v, wq, wo_t), factor_grads) if f.requires_grad]
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad([f for f, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        return (None, None, None, None, *(next(grads) if leaf.requires_grad else None for leaf in leaves))
