"""Argument checks shared by the public op functions.

Every message names the argument, what was expected and what came, so a user can fix the call
without reading our source.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def normal_range(dtype: torch.dtype) -> tuple[float, float]:
    """(smallest, largest) positive normal number of a floating dtype."""
    info = torch.finfo(dtype)
    return info.tiny, info.max


def is_positive_normal(value: float, dtype: torch.dtype) -> bool:
    """True when ``value`` is > 0 and finite and, rounded to ``dtype``, stays a normal number:
    it neither overflows to inf nor underflows to a subnormal (few significant bits, flushed to
    zero by some GPU code) or to 0."""
    if not (value > 0 and math.isfinite(value)):
        return False
    info = torch.finfo(dtype)
    # Round-to-nearest, in float64 arithmetic (no tensor: nothing here may look like a device
    # read): from half an ulp above max on, a value rounds to inf; from half the subnormal
    # spacing below tiny on, up to tiny. Both bounds are exact in float64 (for float64 itself
    # they come out inf and tiny).
    ulp_of_max = info.eps * (info.max / (2 - info.eps))
    return info.tiny - info.tiny * info.eps / 2 <= value < info.max + ulp_of_max / 2


def check_scale_value(name: str, value: float, dtype: torch.dtype) -> None:
    """A multiplier of scores (``1 / temperature``) that is used in ``dtype``: positive, finite
    and a normal ``dtype`` number. Checking it in float64 and using it in float32 turned 1e39
    into inf (and 1e-46 into 0) after the check had passed."""
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    if not is_positive_normal(value, dtype):
        lo, hi = normal_range(dtype)
        raise ValueError(
            f"{name} must lie in [{lo:.3g}, {hi:.3g}], the normal range of {dtype_name(dtype)} (the dtype "
            f"it is computed in; outside it overflows to inf or underflows to a subnormal or 0), got {value:g}"
        )


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_ndim(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    if tensor.ndim != ndim:
        raise ValueError(
            f"{name} must have {ndim} dims {layout}, got shape {tuple(tensor.shape)}"
        )


def check_floating(name: str, tensor: torch.Tensor, allowed=FLOAT_DTYPES + (torch.float64,)) -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise TypeError(f"{name} must have dtype in [{names}], got {dtype_name(tensor.dtype)}")


def check_same_device(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    check_tensor(name, tensor)  # the type first: a list has no .device (AttributeError otherwise)
    if tensor.device != ref.device:
        raise ValueError(
            f"{name} must be on the same device as {ref_name} ({ref.device}), got {tensor.device}"
        )


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, ref_name: str, values: bool = True) -> int:
    """Check packed-sequence offsets ``cu_seqlens`` [B+1] against ``total`` rows; return B.

    ``values=False`` skips the checks that read the tensor's values (one host sync); the shape,
    dtype and device checks always run.
    """
    check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must have dtype int32, got {dtype_name(cu_seqlens.dtype)}")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            "cu_seqlens must have shape [B+1] with B >= 1 (an empty batch has nothing to pool), "
            f"got shape {tuple(cu_seqlens.shape)}"
        )
    if values and not torch.compiler.is_compiling():
        # One transfer for every value check: a device sync is unavoidable to read values.
        cu = cu_seqlens.to("cpu", torch.int64)
        first, last = int(cu[0]), int(cu[-1])
        if first != 0:
            raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {first}")
        if last != total:
            raise ValueError(
                f"cu_seqlens must end at the number of rows of {ref_name} ({total}), "
                f"got cu_seqlens[-1] = {last}"
            )
        steps = cu[1:] - cu[:-1]
        if bool((steps < 0).any()):
            i = int(torch.nonzero(steps < 0)[0])
            raise ValueError(
                "cu_seqlens must be non-decreasing, got "
                f"cu_seqlens[{i}] = {int(cu[i])} > cu_seqlens[{i + 1}] = {int(cu[i + 1])}"
            )
    return cu_seqlens.shape[0] - 1
