"""Exact duplicates among documents: bitwise-equal rows (a false negative of the worst kind)."""

from __future__ import annotations

import torch

from .autograd import row_chunks

__all__ = ["duplicate_keys", "same_rows"]

_INTS = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def _bits(x: torch.Tensor) -> torch.Tensor:
    """x's bits as integers of its element size: equality of floats bit for bit (a float
    comparison would call -0.0 and 0.0 equal and NaN unequal to itself)."""
    return x.view(_INTS[x.element_size()])


def duplicate_keys(documents: torch.Tensor) -> torch.Tensor:
    """[N] int64 ids, equal exactly for bitwise-equal rows of ``documents`` [N, D].

    Ids depend only on row contents (sorted unique rows), so every rank of a process group that
    holds the same gathered documents computes the same ids.

    Example:
        >>> duplicate_keys(torch.tensor([[1.0, 2.0], [0.5, 0.0], [1.0, 2.0]])).tolist()
        [1, 0, 1]
    """
    rows = documents.detach()
    if rows.element_size() in _INTS:
        rows = _bits(rows.contiguous())  # bitwise equality: sorts integers, not floats
    return torch.unique(rows, dim=0, return_inverse=True)[1]


def same_rows(p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """[B, k] bool: n[i, j] bitwise equal to p[i] (p [B, D], n [B, k, D]), in row chunks."""
    p, n = p.detach(), n.detach()
    out = torch.empty(n.shape[:2], dtype=torch.bool, device=n.device)
    for c in row_chunks(n.shape[0], n.shape[1] * n.shape[2]):
        out[c] = (_bits(n[c]) == _bits(p[c])[:, None]).all(-1)
    return out
