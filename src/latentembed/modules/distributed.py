"""Gather embeddings from every rank with gradients flowing back to their owners.

Contrastive losses want every query to meet every rank's documents. ``all_gather`` alone has no
gradient, so each rank's embeddings would only learn from its own loss. :class:`AllGatherWithGrad`
gathers in the forward pass and, in the backward pass, sums the gradient every rank computed for
the gathered tensor (``all_reduce``) and keeps its own rows: exactly the gradient of the SUM of
all ranks' losses with respect to this rank's embeddings.

Gradient scaling under DDP: with B queries on every rank and each rank's loss the mean over
its own queries, the sum of the ranks' losses is W times the global mean over W*B queries, and
DDP divides the parameter gradients by W when it averages them: the result is the gradient of
the global mean loss, as with one process on the concatenated batch. With unequal numbers of
queries B_r this no longer holds (a rank's mean weighs its queries by 1 / B_r, not 1 / sum B_r):
use ``reduction="sum"`` and divide by the global query count (``sum_r B_r``, one all_reduce) to
get the global mean. (Without DDP, the embedding gradient on each rank is that of the SUM of
the ranks' losses; ``reduction="sum"`` gives the single-process sum's gradients exactly.)

Sizes: ranks may hold different numbers of rows; the gather then needs every rank's count (one
small collective plus a host read). Pass ``sizes`` when you know them (e.g. ``[n] * world`` for
equal batches) to skip it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.distributed as dist

__all__ = ["AllGatherWithGrad", "all_gather_with_grad", "all_gather_no_grad", "distributed_world", "gather_sizes"]


def distributed_world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_sizes(n: Union[int, Sequence[int]], device: torch.device, group=None) -> list:
    """Every rank's first dimension ``n`` (an int: list of ints), or several counts at once (a
    sequence: list of lists, rank by rank): one small all_gather and one host read either way.

    Call it once per step for all the tensors you gather, or skip it when every rank is known to
    hold the same sizes (``[n] * world``): it is a collective and a device sync."""
    _, world = distributed_world(group)
    counts = [n] if isinstance(n, int) else [int(c) for c in n]
    local = torch.tensor(counts, dtype=torch.int64, device=device)
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    rows = torch.stack(out).tolist()
    return [r[0] for r in rows] if isinstance(n, int) else rows


def _order(rank: int, world: int) -> list[int]:
    """Ranks in rotated order: this rank first, then r+1, ..., r-1."""
    return list(range(rank, world)) + list(range(rank))


def _rotated(parts: list[torch.Tensor], rank: int, rotate: bool) -> torch.Tensor:
    order = _order(rank, len(parts)) if rotate else range(len(parts))
    return torch.cat([parts[r] for r in order], dim=0)


def _gather_parts(x: torch.Tensor, sizes: list[int], group) -> list[torch.Tensor]:
    # all_gather needs equal shapes: pad every rank's rows to the largest, then trim.
    longest = max(sizes)
    padded = x
    if x.shape[0] < longest:
        padded = torch.cat([x, x.new_zeros((longest - x.shape[0],) + tuple(x.shape[1:]))])
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous(), group=group)
    return [part[:n] for part, n in zip(out, sizes)]


class AllGatherWithGrad(torch.autograd.Function):
    """``forward(x, sizes, rotate, group)``: every rank's x concatenated along dim 0.

    ``rotate=True`` puts this rank's rows first (then ranks r+1, ..., r-1), so indices into the
    local tensor stay valid in the gathered one. Backward: all_reduce(sum) of the gathered
    gradient, then this rank's slice.
    """

    @staticmethod
    def forward(ctx, x, sizes: list[int], rotate: bool, group):
        rank, _ = distributed_world(group)
        ctx.sizes, ctx.rotate, ctx.group, ctx.rank = sizes, rotate, group, rank
        return _rotated(_gather_parts(x, sizes, group), rank, rotate)

    @staticmethod
    def backward(ctx, grad):
        sizes, rank = ctx.sizes, ctx.rank
        if ctx.rotate:  # back to rank order, so that every rank sums matching rows
            order = _order(rank, len(sizes))
            parts = dict(zip(order, grad.split([sizes[r] for r in order])))
            grad = torch.cat([parts[r] for r in range(len(sizes))])
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(sizes[:rank])
        return grad[start : start + sizes[rank]], None, None, None


def all_gather_with_grad(
    x: torch.Tensor, *, rotate: bool = False, sizes: Optional[list[int]] = None, group=None
) -> torch.Tensor:
    """Concatenate ``x`` [n_r, ...] of every rank along dim 0, differentiably.

    Ranks may hold different numbers of rows (``sizes``, gathered when not given). Without an
    initialised process group (or with one rank) ``x`` is returned as is. Gradients flow back to
    the rank that owns each row (see the module docstring for the scaling under DDP).

    Example (on every rank of a 2-process group, each with 4 rows)::

        z = all_gather_with_grad(torch.randn(4, 8, requires_grad=True))  # [8, 8]
    """
    rank, world = distributed_world(group)
    if world == 1:
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device, group)
    return AllGatherWithGrad.apply(x, sizes, rotate, group)


def all_gather_no_grad(
    x: torch.Tensor, *, rotate: bool = False, sizes: Optional[list[int]] = None, group=None
) -> torch.Tensor:
    """Like :func:`all_gather_with_grad` for tensors without gradients (indices, ids)."""
    rank, world = distributed_world(group)
    if world == 1:
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device, group)
    return _rotated(_gather_parts(x, sizes, group), rank, rotate)
