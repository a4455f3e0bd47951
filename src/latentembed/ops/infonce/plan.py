"""The memory plan of the Triton backward of the masked logsumexp: which buffers it allocates.

The backward needs dS = g * scale * p [B, N] twice: dq = dS d (a contraction over all N
documents) and dd = dS^T q. Storing dS whole would cost as much as the score matrix the op
avoids; two plans bound it (derivation in docs/ops/infonce.md, "Backward memory plan"):

* **one pass** (B <= D, the usual case: the target is B = D = 4096). dS^T [N, B] takes no more
  room than dd [N, D], so the tile kernel writes all of dS^T into the buffer that will hold dd.
  Then dq = dS d is ONE cuBLAS GEMM over all N documents, written once in the input dtype
  (rounded once, as PyTorch's own matmul: no fp32 accumulator, no read-modify-write), and dd is
  computed in blocks [a, b) of ``dd_rows`` documents in order, each GEMM writing rows that no
  unread dS^T row occupies: dd starts the buffer and dS^T starts ``dst_offset`` elements in, with
  ``b*D <= dst_offset + a*B`` for every block (dd's block ends before the first unread dS^T row,
  row a, begins). At B = D that is one block's worth of room past dd's end.
* **chunked** (B > D: dS^T of every document would not fit). Chunks of documents each get dS^T
  [chunk, B] in a separate buffer; dd[chunk] = dS^T q is written once and dq accumulates
  chunk by chunk in float32 (one [B, D] read-modify-write per chunk, so chunks are large).

Everything here is arithmetic on shapes: the launcher allocates exactly what :func:`backward_plan`
says, and tests check both the plan and what a run allocates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["BackwardPlan", "backward_plan"]

# dd's blocks in the one-pass plan: about 2^22 dS^T elements (8 MiB in bf16) each, the room kept
# in front of dd, and never fewer than 1,024 documents (at B = D = 4096: [1024, 4096] @ [4096,
# 4096] GEMMs, 256 output tiles of 128 x 128 for 132 SMs).
_DD_BLOCK_ELEMENTS = 1 << 22
_MIN_DD_ROWS = 1024
# Chunked plan: dS^T chunks of at least 1,024 and at most 8,192 documents, and at most a quarter
# of dd's size. Each chunk's dq update reads and writes the fp32 [B, D] accumulator; against the
# chunk's dq GEMM that costs ~930 / chunk of its time at 3 TB/s and 700 TFLOP/s (10% at 8192).
_MIN_CHUNK_DOCS = 1024
_MAX_CHUNK_DOCS = 8192


@dataclass(frozen=True)
class BackwardPlan:
    """Buffers of one backward call, in elements.

    Attributes:
        one_pass: dS^T of all N documents lives in dd's buffer (see the module docstring).
        chunk: documents per tile launch and dS^T block (N in the one-pass plan).
        dd_rows: documents per dd GEMM.
        buffer_elements: the buffer holding dd [N, D] from its start (and, one-pass, dS^T),
            input dtype.
        dst_offset: where dS^T [N, B] starts in that buffer (one-pass plan; 0 otherwise).
        ds_elements: the separate dS^T chunk buffer (chunked plan), input dtype; 0 otherwise.
        dq_accumulator_elements: float32 elements of the dq accumulator (chunked plan with a
            16-bit input; dq then lives in its storage); 0 otherwise.
    """

    one_pass: bool
    chunk: int
    dd_rows: int
    buffer_elements: int
    dst_offset: int
    ds_elements: int
    dq_accumulator_elements: int

    def extra_bytes(self, B: int, D: int, element_size: int, groups: int) -> int:
        """Bytes allocated by the backward, its gradients included: the dd buffer, dq (or its
        accumulator), the dS^T chunk and the [groups, B] fp32 dscale partials."""
        dq = self.dq_accumulator_elements * 4 if self.dq_accumulator_elements else B * D * element_size
        partials = groups * B * 4
        return self.buffer_elements * element_size + dq + self.ds_elements * element_size + partials


def backward_plan(
    B: int, N: int, D: int, dtype: torch.dtype, *, one_pass: Optional[bool] = None, chunk: Optional[int] = None
) -> BackwardPlan:
    """The :class:`BackwardPlan` for q [B, D], d [N, D] of ``dtype``.

    ``one_pass`` and ``chunk`` override the choice (tests exercise both plans at small sizes);
    ``one_pass=True`` needs B <= D.

    Example:
        >>> plan = backward_plan(4096, 16384, 4096, torch.bfloat16)
        >>> plan.one_pass, plan.dd_rows, plan.buffer_elements * 2 // 2**20  # MiB: dd + 8 MiB
        (True, 1024, 136)
        >>> plan.dst_offset == 1024 * 4096  # dS^T starts one dd block in
        True
    """
    fits = B <= D
    one_pass = fits if one_pass is None else one_pass
    if one_pass and not fits:
        raise ValueError(f"the one-pass backward needs B <= D (dS^T [N, B] inside dd [N, D]), got B={B}, D={D}")
    if one_pass:
        dd_rows = min(N, max(_MIN_DD_ROWS, _DD_BLOCK_ELEMENTS // B)) if chunk is None else min(N, chunk)
        # b*D - a*B grows with a (B <= D) for full blocks: the last two blocks bound every block.
        last = (N - 1) // dd_rows * dd_rows
        blocks = [(last, N)] + ([(last - dd_rows, last)] if last else [])
        offset = max(b * D - a * B for a, b in blocks)
        return BackwardPlan(True, N, dd_rows, offset + N * B, offset, 0, 0)
    if chunk is None:
        chunk = max(_MIN_CHUNK_DOCS, min(_MAX_CHUNK_DOCS, N * D // (4 * B)))
    chunk = min(N, chunk)
    accumulator = B * D if dtype != torch.float32 else 0
    return BackwardPlan(False, chunk, chunk, N * D, 0, chunk * B, accumulator)
