"""Rows grouped by adapter, computed once per forward and reused by every multi-LoRA layer.

The kernels never look at the adapter index of a row directly: they walk a table of blocks,
each a run of at most ``BLOCK_M`` consecutive positions of ``sorted_rows`` that all belong to one
adapter (Punica's SGMV segments, cut into fixed-size tiles as in LoRAFusion). A block of adapter
-1 (base only) just copies ``base_out`` in the forward and writes zero gradient in the backward:
no LoRA arithmetic and no weight reads.

Building the tables needs the per-adapter row counts on the host: that is one device-to-host
copy of T+1 integers (a sync) per ``group_by_adapter`` call. The per-layer op reads only the
tensors below and never syncs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import checks

#: Rows per tile of the forward/backward kernels; every block holds rows of one adapter only.
BLOCK_M = 64
#: Rows per partial sum of the weight gradients (dA, dB); a multiple of BLOCK_M. Larger blocks
#: mean fewer fp32 partials to write and re-read; smaller ones more parallelism for few rows.
REDUCE_M = 256


class LoRAGrouping(NamedTuple):
    """Rows of a batch sorted by adapter, plus the block tables the kernels walk.

    Positions ``p`` index ``sorted_rows``; row ``sorted_rows[p]`` is a row of x / base_out.
    Rows with an adapter come first, sorted by adapter (stable: equal adapters keep their order),
    then the base-only rows (adapter -1), also in their original order.

    Attributes:
        adapter_index: [N] int64, the adapter of each row (-1 = base only), as given.
        sorted_rows: [N] int64, row ids in adapter order (base-only rows last).
        segment_offsets: [T+1] int32, adapter t owns positions
            ``segment_offsets[t]:segment_offsets[t+1]``; positions from ``segment_offsets[T]``
            to N are the base-only rows.
        blocks: [NB, 3] int32 rows ``(adapter, start, end)``: positions ``start:end`` (at most
            ``BLOCK_M``) of one adapter, or of the base-only rows with adapter -1. They cover
            all N positions exactly once.
        reduce_blocks: [NR, 3] int32 ``(adapter, start, end)`` with at most ``REDUCE_M``
            positions each, covering the rows that have an adapter (base-only rows have no
            weight gradient to contribute).
        reduce_offsets: [T+1] int32, adapter t owns reduce blocks
            ``reduce_offsets[t]:reduce_offsets[t+1]`` (none when it has no rows).
        num_rows: N.  num_adapters: T.  num_active: rows with an adapter (host int).
    """

    adapter_index: torch.Tensor
    sorted_rows: torch.Tensor
    segment_offsets: torch.Tensor
    blocks: torch.Tensor
    reduce_blocks: torch.Tensor
    reduce_offsets: torch.Tensor
    num_rows: int
    num_adapters: int
    num_active: int


def _tile_segments(starts: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor, size: int):
    """Cut segments (CPU int64 tensors) into tiles of at most ``size``: [NB, 3] int32, tiles/segment."""
    per_segment = (lengths + size - 1) // size
    total = int(per_segment.sum())
    seg = torch.repeat_interleave(torch.arange(len(lengths)), per_segment, output_size=total)
    first_tile = torch.cumsum(per_segment, 0) - per_segment
    within = torch.arange(total) - first_tile[seg]
    start = starts[seg] + within * size
    end = torch.minimum(start + size, starts[seg] + lengths[seg])
    table = torch.stack([ids[seg], start, end], dim=1).to(torch.int32)
    return table, per_segment


def group_by_adapter(adapter_index: torch.Tensor, num_adapters: int) -> LoRAGrouping:
    """Sort rows by adapter once per forward; pass the result to every multi-LoRA layer.

    Args:
        adapter_index: [N] integer tensor (any integer dtype; int64 is kept as is), the adapter of
            each row (token) in ``[-1, num_adapters)``; -1 means "base layer only".
        num_adapters: T, the number of stacked adapters (>= 1).

    Returns:
        A :class:`LoRAGrouping` on adapter_index's device. Costs one host sync (reading the T+1
        row counts and checking the index range); the layers that use it never sync.

    Example:
        >>> g = group_by_adapter(torch.tensor([2, -1, 0, 2, 0]), num_adapters=3)
        >>> g.sorted_rows.tolist(), g.segment_offsets.tolist()
        ([2, 4, 0, 3, 1], [0, 2, 2, 4])
    """
    checks.check_tensor("adapter_index", adapter_index)
    if adapter_index.dtype.is_floating_point or adapter_index.dtype.is_complex or adapter_index.dtype == torch.bool:
        raise TypeError(
            f"adapter_index must have an integer dtype (int64 preferred), got {checks.dtype_name(adapter_index.dtype)}"
        )
    checks.check_ndim("adapter_index", adapter_index, 1, "[N] (one adapter per row)")
    if isinstance(num_adapters, bool) or not isinstance(num_adapters, int) or num_adapters < 1:
        raise ValueError(f"num_adapters must be an int >= 1, got {num_adapters!r}")
    index = adapter_index.long()
    n, t = index.shape[0], num_adapters
    # Base-only rows get key T so they sort after every adapter; a stable sort keeps row order
    # within an adapter (deterministic gradients, cache-friendly gathers).
    key = torch.where(index < 0, torch.full_like(index, t), index)
    sorted_rows = torch.sort(key, stable=True).indices
    counts_dev = torch.bincount(key.clamp(0, t + 1), minlength=t + 2)
    # The one host sync: counts decide the table sizes. Bad indices are counted, not hidden:
    # below -1 shows up as an extra key-T row (detected via min), at or above T in the extra bins.
    stats = torch.cat(
        [
            counts_dev,
            index.min(0, keepdim=True).values if n else index.new_zeros(1),
            index.max(0, keepdim=True).values if n else index.new_zeros(1),
        ]
    ).cpu()
    counts, low, high = stats[: t + 2], int(stats[t + 2]), int(stats[t + 3])
    if n and (low < -1 or high >= t):
        bad = low if low < -1 else high
        raise ValueError(
            f"adapter_index values must be in [-1, num_adapters) = [-1, {t}), got {bad} (min {low}, max {high})"
        )
    counts = counts[: t + 1]  # t adapters, then the base-only rows
    offsets = torch.cumsum(counts, 0) - counts  # start position of each segment
    ids = torch.arange(t + 1)
    ids[t] = -1
    blocks, _ = _tile_segments(offsets, counts, ids, BLOCK_M)
    reduce_blocks, per_adapter = _tile_segments(offsets[:t], counts[:t], ids[:t], REDUCE_M)
    reduce_offsets = torch.zeros(t + 1, dtype=torch.int32)
    reduce_offsets[1:] = torch.cumsum(per_adapter, 0)
    segment_offsets = torch.zeros(t + 1, dtype=torch.int32)
    segment_offsets[1:] = torch.cumsum(counts[:t], 0)
    # One host-to-device copy for all four tables; the fields are views of that one buffer.
    host = torch.cat([blocks.flatten(), reduce_blocks.flatten(), reduce_offsets, segment_offsets])
    dev = host.to(adapter_index.device)
    nb, nr = blocks.shape[0] * 3, reduce_blocks.shape[0] * 3
    return LoRAGrouping(
        adapter_index=index,
        sorted_rows=sorted_rows,
        segment_offsets=dev[nb + nr + t + 1 :],
        blocks=dev[:nb].view(-1, 3),
        reduce_blocks=dev[nb : nb + nr].view(-1, 3),
        reduce_offsets=dev[nb + nr : nb + nr + t + 1],
        num_rows=n,
        num_adapters=t,
        num_active=int(segment_offsets[t]),
    )
