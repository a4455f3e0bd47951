"""LoRA dropout that stores neither a mask nor a dropped copy of the input.

PEFT (and ``nn.Dropout`` before an adapter) keeps, per wrapped layer and row, a dropout mask
and the dropped input ``dropout(x)`` for the backward: 5 bytes per input element in fp32, on
top of whatever the base layer keeps. Here the mask is a pure function of an integer seed drawn
from the default CPU generator at the forward (so ``torch.utils.checkpoint``'s and GradCache's
replay of the random state draw the same seed); the backward regenerates it and rebuilds
``dropout(x)`` from ``x``, which the layer keeps anyway (the wrapped layers of one input, e.g.
q/k/v, share it). What stays per layer is ``x`` (shared) and the adapter's [N, r] activations.

The mask: element i of ``x`` is kept when the i-th 16-bit lane of a stream of random 64-bit
words (``Tensor.random_`` under a ``torch.Generator`` seeded with the seed) is at least a
threshold, so P(keep) = 1 - round(p * 2^16) / 2^16 (p = 0.1 gives 0.1000061), and the result
is ``F.dropout``'s ``x * mask / (1 - p)`` to rounding: the 1 / (1 - p) is applied to the
adapter's [N, r] activations, so the [N, in] input is only masked, never multiplied. One random
word serves 4 elements, where ``bernoulli_`` draws per element: the regeneration in the
backward costs less than the one draw PEFT makes (docs/performance.md).

Two autograd Functions, picked by :func:`multi_lora_add_with_dropout`:
- the reference backend (CPU, or asked for): the reference's arithmetic
  (:func:`~latentembed.ops.multi_lora.multi_lora_linear_add_ref`, adapter by adapter, in the same
  order) with a hand-written backward, so no matmul is recomputed;
- other backends (Triton on CUDA): the op's forward on the dropped input; the backward rebuilds
  the dropped input and takes the op's vector-Jacobian product (one LoRA forward recomputed,
  [N, r] and [N, out] work, against the [N, in] copy it saves).
"""

from __future__ import annotations

import torch

from ..ops.dispatch import select_backend
from ..ops.multi_lora import BACKENDS, LoRAGrouping, multi_lora_linear_add

__all__ = ["draw_seed", "dropout_keep_mask", "seeded_dropout", "multi_lora_add_with_dropout"]

_LANES = 2**16


def draw_seed() -> int:
    """A seed for one dropout mask, from the default CPU generator (replayed by checkpointing
    and GradCache, which restore the random state)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def dropout_keep_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Bool keep-mask of ``shape`` (True = keep, probability 1 - round(p * 2^16) / 2^16), a pure
    function of ``(shape, p, seed, device type)``.

    Example:
        >>> keep = dropout_keep_mask(torch.Size([4, 5]), 0.25, seed=3, device=torch.device("cpu"))
        >>> keep.shape, keep.dtype, torch.equal(keep, dropout_keep_mask(keep.shape, 0.25, 3, keep.device))
        (torch.Size([4, 5]), torch.bool, True)
    """
    numel = 1
    for s in shape:
        numel *= s
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    # Four 16-bit lanes per random 64-bit word: one generator call per 4 elements.
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    lanes = words.random_(-(2**63), None, generator=generator).view(torch.int16)[:numel]
    threshold = round(p * _LANES) - 2**15  # int16 lanes are uniform on [-2^15, 2^15)
    return (lanes >= threshold).view(shape)


def seeded_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``F.dropout`` given the mask of :func:`dropout_keep_mask`: ``x * keep * (1 / (1 - p))``.
    The reference the Functions below are tested against (not differentiable by itself)."""
    return x * dropout_keep_mask(x.shape, p, seed, x.device) * (1.0 / (1.0 - p))


def _dropped_scale(scaling: torch.Tensor, x: torch.Tensor, p: float) -> torch.Tensor:
    """scaling [T] / (1 - p) in x's dtype: the dropout's 1 / (1 - p) moves onto the [N, r]
    adapter activations, so the [N, in] input is only masked, never multiplied."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (scaling.to(acc) * (1.0 / (1.0 - p))).to(x.dtype)


def _segments(grouping: LoRAGrouping) -> tuple[torch.Tensor, list]:
    """(row order, rows per adapter) in the reference op's order: ``grouping.sorted_rows`` is
    its stable sort by adapter, base-only rows last (one host read of T+1 offsets)."""
    offsets = grouping.segment_offsets.tolist()
    return grouping.sorted_rows, [hi - lo for lo, hi in zip(offsets[:-1], offsets[1:])]


class _ReferenceDroppedLoRA(torch.autograd.Function):
    """``multi_lora_linear_add_ref(base_out, seeded_dropout(x), ...)`` that saves x, not the
    dropped copy; forward(base_out, x, lora_a, lora_b, scaling, grouping, p, seed)."""

    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, scaling, grouping, p, seed):
        n, t = x.shape[0], lora_a.shape[0]
        order, counts = _segments(grouping)
        scale = _dropped_scale(scaling, x, p)
        kept = torch.where(dropout_keep_mask(x.shape, p, seed, x.device), x, 0.0)
        out, start, shrunk = base_out, 0, []
        for adapter in range(t):
            rows = order[start : start + counts[adapter]]
            start += counts[adapter]
            if not counts[adapter]:  # its weights get exact zero gradients
                shrunk.append(None)
                continue
            whole = counts[adapter] == n
            h = ((kept if whole else kept.index_select(0, rows)) @ lora_a[adapter].T) * scale[adapter]
            shrunk.append(h)
            delta = h @ lora_b[adapter].T
            out = out + delta if whole else out.index_add(0, rows, delta)
        ctx.save_for_backward(x, lora_a, lora_b, scale, order, *shrunk)
        ctx.counts, ctx.p, ctx.seed = counts, p, seed
        return out

    @staticmethod
    def backward(ctx, grad):
        x, lora_a, lora_b, scale, order, *shrunk = ctx.saved_tensors
        n = x.shape[0]
        need_x, need_a, need_b = ctx.needs_input_grad[1:4]
        keep = dropout_keep_mask(x.shape, ctx.p, ctx.seed, x.device)
        kept = torch.where(keep, x, 0.0) if need_a else None
        grad_a = torch.zeros_like(lora_a) if need_a else None
        grad_b = torch.zeros_like(lora_b) if need_b else None
        grad_kept, start = None, 0
        for adapter, count in enumerate(ctx.counts):
            rows = order[start : start + count]
            start += count
            if not count:
                continue
            whole = count == n
            g = grad if whole else grad.index_select(0, rows)
            if need_b:
                grad_b[adapter] = g.T @ shrunk[adapter]
            grad_h = (g @ lora_b[adapter]) * scale[adapter]
            if need_a:
                grad_a[adapter] = grad_h.T @ (kept if whole else kept.index_select(0, rows))
            if need_x:
                gx = grad_h @ lora_a[adapter]
                if whole:
                    grad_kept = gx
                else:
                    grad_kept = x.new_zeros(x.shape) if grad_kept is None else grad_kept
                    grad_kept.index_add_(0, rows, gx)
        if need_x and grad_kept is None:  # no row has an adapter
            grad_kept = torch.zeros_like(x)
        grad_x = torch.where(keep, grad_kept, 0.0) if need_x else None
        return grad if ctx.needs_input_grad[0] else None, grad_x, grad_a, grad_b, None, None, None, None


class _RecomputedDroppedLoRA(torch.autograd.Function):
    """``multi_lora_linear_add(base_out, seeded_dropout(x), ...)`` with any backend, saving x
    and recomputing the adapter forward in the backward; forward(base_out, x, lora_a, lora_b,
    scaling, grouping, p, seed, backend)."""

    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, scaling, grouping, p, seed, backend):
        kept = torch.where(dropout_keep_mask(x.shape, p, seed, x.device), x, 0.0)
        scale = _dropped_scale(scaling, x, p)
        out = multi_lora_linear_add(base_out, kept, lora_a, lora_b, scale, grouping, backend=backend, validate=False)
        ctx.save_for_backward(x, lora_a, lora_b, scale)
        ctx.grouping, ctx.p, ctx.seed, ctx.backend = grouping, p, seed, backend
        return out

    @staticmethod
    def backward(ctx, grad):
        x, lora_a, lora_b, scale = ctx.saved_tensors
        keep = dropout_keep_mask(x.shape, ctx.p, ctx.seed, x.device)
        leaves = [torch.where(keep, x, 0.0), lora_a.detach(), lora_b.detach()]
        wanted = ctx.needs_input_grad[1:4]
        for leaf, need in zip(leaves, wanted):
            leaf.requires_grad_(need)
        with torch.enable_grad():
            out = multi_lora_linear_add(
                grad.new_zeros(grad.shape), *leaves, scale, ctx.grouping, backend=ctx.backend, validate=False
            )
            inputs = [leaf for leaf, need in zip(leaves, wanted) if need]
            grads = iter(torch.autograd.grad(out, inputs, grad) if inputs else ())
        grad_kept, grad_a, grad_b = (next(grads) if need else None for need in wanted)
        grad_x = torch.where(keep, grad_kept, 0.0) if grad_kept is not None else None
        return grad if ctx.needs_input_grad[0] else None, grad_x, grad_a, grad_b, None, None, None, None, None


def multi_lora_add_with_dropout(
    base_out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    grouping: LoRAGrouping,
    *,
    p: float,
    seed: int,
    backend: str = "auto",
) -> torch.Tensor:
    """``multi_lora_linear_add(base_out, seeded_dropout(x, p, seed), lora_a, lora_b, scaling,
    grouping)`` (shapes there: x [N, in], base_out [N, out], lora_a [T, R, in], lora_b [T, out,
    R], scaling [T]), differentiable in base_out, x, lora_a and lora_b, keeping neither the mask
    nor the dropped input for the backward. Arguments are assumed valid (the caller checked).

    Example:
        >>> from latentembed.ops.multi_lora import group_by_adapter
        >>> x, base = torch.randn(5, 8, requires_grad=True), torch.randn(5, 6)
        >>> a, b = torch.randn(2, 4, 8), torch.randn(2, 6, 4)
        >>> g = group_by_adapter(torch.tensor([1, -1, 0, 1, 0]), num_adapters=2)
        >>> multi_lora_add_with_dropout(base, x, a, b, torch.ones(2), g, p=0.1, seed=0).shape
        torch.Size([5, 6])
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    chosen = select_backend("multi_lora_linear_add", BACKENDS, backend, x.device, x.dtype, lora_a)
    if chosen.name == "reference":
        return _ReferenceDroppedLoRA.apply(base_out, x, lora_a, lora_b, scaling, grouping, p, seed)
    return _RecomputedDroppedLoRA.apply(base_out, x, lora_a, lora_b, scaling, grouping, p, seed, backend)
