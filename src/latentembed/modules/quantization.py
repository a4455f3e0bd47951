"""Quantised embeddings: int8 / uint8 (per-dimension buckets from calibration) and binary codes.

The codes are those of sentence-transformers' ``quantize_embeddings`` (tested equal to it):

* ``uint8``: ``clamp(floor((x - start) / step), 0, 255)`` with ``start`` / ``step`` per dimension
  from the calibration ranges (``step = (max - min) / 255``, 1 for a constant dimension);
  ``int8``: the same minus 128. Values outside the calibration range take the end codes.
* ``binary`` / ``ubinary``: the sign bits ``x > 0`` packed 8 per byte, most significant bit
  first (``numpy.packbits``), as int8 (``byte - 128``) or uint8; D/8 bytes per vector (D is
  padded with zero bits up to a multiple of 8).

Calibration: without ``ranges`` or ``calibration`` the buckets come from the embeddings being
quantised, so two calls (queries, documents) get different buckets; compute ``ranges`` once
(:func:`calibration_ranges` of a sample of documents) and pass them to every call.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch

__all__ = [
    "PRECISIONS",
    "calibration_ranges",
    "quantize_embeddings",
    "dequantize_embeddings",
    "unpack_binary",
    "hamming_distance",
    "bytes_per_vector",
]

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
# popcount of every byte value, for Hamming distances (torch has no popcount)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def _check_embeddings(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor [N, D], got {x.dtype} of shape {tuple(x.shape)}")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")


def calibration_ranges(calibration: torch.Tensor) -> torch.Tensor:
    """[2, D] float32: the per-dimension minimum and maximum of ``calibration`` [N, D].

    >>> calibration_ranges(torch.tensor([[0.0, 1.0], [2.0, -1.0]]))
    tensor([[ 0., -1.],
            [ 2.,  1.]])
    """
    calibration = _as_tensor(calibration)
    _check_embeddings("calibration", calibration)
    if calibration.shape[0] == 0:
        raise ValueError("calibration: expected at least one embedding, got none")
    x = calibration.float()
    return torch.stack([x.min(0).values, x.max(0).values])


def _as_tensor(x):
    """numpy arrays (what sentence-transformers users hold) as tensors; the rest unchanged."""
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def _ranges(embeddings: torch.Tensor, ranges: Optional[torch.Tensor], calibration: Optional[torch.Tensor]):
    ranges, calibration = _as_tensor(ranges), _as_tensor(calibration)
    if ranges is not None and calibration is not None:
        raise ValueError("pass ranges or calibration, not both")
    if ranges is None and calibration is None and embeddings.shape[0] < 2:
        raise ValueError(
            "int8 / uint8 buckets cannot be computed from a single embedding: pass ranges= or calibration="
        )
    if ranges is None and calibration is None:
        warnings.warn(
            f"int8 buckets computed from the {embeddings.shape[0]} embeddings being quantised; pass ranges= "
            "(calibration_ranges of a document sample) so that every call uses the same buckets",
            stacklevel=3,
        )
    if ranges is None:
        ranges = calibration_ranges(embeddings if calibration is None else calibration)
    if not isinstance(ranges, torch.Tensor) or tuple(ranges.shape) != (2, embeddings.shape[1]):
        got = tuple(ranges.shape) if isinstance(ranges, torch.Tensor) else type(ranges).__name__
        raise ValueError(f"ranges: expected a tensor [2, {embeddings.shape[1]}] (min, max per dimension), got {got}")
    return ranges.float().to(embeddings.device)


def quantize_embeddings(
    embeddings: torch.Tensor,
    precision: str = "int8",
    *,
    ranges: Optional[torch.Tensor] = None,
    calibration: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Quantise ``embeddings`` [N, D] (module docstring for the codes).

    Args:
        precision: ``"float32"`` (returned as float32), ``"int8"``, ``"uint8"``, ``"binary"``,
            ``"ubinary"``.
        ranges: [2, D] per-dimension (min, max) for int8 / uint8 (:func:`calibration_ranges`);
            a tensor or a numpy array.
        calibration: [M, D] embeddings to compute the ranges from (instead of ``ranges``).

    Returns:
        int8 / uint8 [N, D], or int8 / uint8 [N, ceil(D / 8)] for binary / ubinary.

    Example:
        >>> quantize_embeddings(torch.tensor([[0.5, -1.0, 2.0, 0.0, 1, 1, 1, -1]]), "ubinary")
        tensor([[174]], dtype=torch.uint8)
    """
    _check_embeddings("embeddings", embeddings)
    _check_precision(precision)
    x = embeddings.float()
    if precision == "float32":
        return x
    if precision in ("binary", "ubinary"):
        bits = x > 0
        pad = (-bits.shape[1]) % 8
        if pad:
            bits = torch.nn.functional.pad(bits, (0, pad))
        weights = _BIT_WEIGHTS.to(x.device)
        packed = (bits.view(bits.shape[0], -1, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)
        return packed if precision == "ubinary" else (packed.to(torch.int16) - 128).to(torch.int8)
    ranges = _ranges(x, ranges, calibration)
    starts, steps = ranges[0], (ranges[1] - ranges[0]) / 255
    steps = torch.where(steps == 0, 1.0, steps)
    levels = ((x - starts) / steps).floor().clamp(0, 255)
    return levels.to(torch.uint8) if precision == "uint8" else (levels - 128).to(torch.int8)


def dequantize_embeddings(codes: torch.Tensor, precision: str, *, ranges: torch.Tensor) -> torch.Tensor:
    """The float32 values [N, D] that int8 / uint8 ``codes`` stand for (each bucket's centre),
    to score float queries against quantised documents."""
    if precision not in ("int8", "uint8"):
        raise ValueError(
            f"precision: expected 'int8' or 'uint8' (binary codes are compared by Hamming), got {precision!r}"
        )
    starts, steps = ranges[0].float(), (ranges[1].float() - ranges[0].float()) / 255
    steps = torch.where(steps == 0, 1.0, steps)
    level = codes.float() + (128 if precision == "int8" else 0)
    # the bucket's centre (sentence-transformers takes its start): a shift by half a step per
    # dimension, which changes every score of a query by the same amount, so no ranking
    return starts + (level + 0.5) * steps


def unpack_binary(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """[N, dim] bool sign bits of binary / ubinary ``codes`` [N, ceil(dim / 8)]."""
    packed = codes.to(torch.int16) + 128 if codes.dtype == torch.int8 else codes.to(torch.int16)
    bits = (packed[..., None] & _BIT_WEIGHTS.to(codes.device, torch.int16)) != 0
    return bits.flatten(-2)[..., :dim]


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[Na, Nb] int32 Hamming distances between packed codes ``a`` [Na, B] and ``b`` [Nb, B]
    (both binary or both ubinary: XOR of the bytes, then a popcount table)."""
    if a.dtype != b.dtype or a.dtype not in (torch.int8, torch.uint8) or a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"hamming_distance: expected two packed code tensors of one dtype (int8 or uint8) and width, "
            f"got {a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}"
        )
    xor = torch.bitwise_xor(a.view(torch.uint8)[:, None, :], b.view(torch.uint8)[None, :, :])
    return _POPCOUNT.to(a.device)[xor.long()].sum(-1, dtype=torch.int32)


def bytes_per_vector(dim: int, precision: str) -> int:
    """Bytes one D-dimensional vector takes in ``precision`` (4 D, D or ceil(D / 8)).

    >>> [bytes_per_vector(576, p) for p in PRECISIONS]
    [2304, 576, 576, 72, 72]
    """
    _check_precision(precision)
    return 4 * dim if precision == "float32" else dim if precision in ("int8", "uint8") else -(-dim // 8)
