"""Argument checks shared by the public op functions and by the layers above them.

Every message names the argument, what was expected and what came, so a user can fix the call
without reading our source. A check is written once, here, at the lowest layer that can make
it; modules and models call these instead of repeating them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

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
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(tensor.shape)}")


def check_floating(name: str, tensor: torch.Tensor, allowed=FLOAT_DTYPES + (torch.float64,)) -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise TypeError(f"{name} must have dtype in [{names}], got {dtype_name(tensor.dtype)}")


def check_same_device(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    check_tensor(name, tensor)  # the type first: a list has no .device (AttributeError otherwise)
    if tensor.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {tensor.device}")


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
                f"cu_seqlens must end at the number of rows of {ref_name} ({total}), got cu_seqlens[-1] = {last}"
            )
        steps = cu[1:] - cu[:-1]
        if bool((steps < 0).any()):
            i = int(torch.nonzero(steps < 0)[0])
            raise ValueError(
                "cu_seqlens must be non-decreasing, got "
                f"cu_seqlens[{i}] = {int(cu[i])} > cu_seqlens[{i + 1}] = {int(cu[i + 1])}"
            )
    return cu_seqlens.shape[0] - 1


def check_hidden_states(hidden: object, cu_seqlens: Optional[torch.Tensor], *, validate: bool = True) -> None:
    """Hidden states as the pooling ops take them: a floating tensor, padded [B, L, D] with
    B >= 1, or packed [T, D] with int32 offsets ``cu_seqlens`` [B+1] on hidden's device.

    ``validate=False`` skips the checks that read cu_seqlens' values (one host sync).
    """
    check_tensor("hidden", hidden)
    check_floating("hidden", hidden)
    if cu_seqlens is not None:
        check_ndim("hidden", hidden, 2, "[T, D] when cu_seqlens is given")
        check_same_device("cu_seqlens", cu_seqlens, "hidden", hidden)
        check_cu_seqlens(cu_seqlens, hidden.shape[0], "hidden", values=validate)
    else:
        check_ndim("hidden", hidden, 3, "[B, L, D] (or [T, D] with cu_seqlens)")
        if hidden.shape[0] == 0:
            raise ValueError(f"hidden has an empty batch (B = 0), shape {tuple(hidden.shape)}")


def check_row_mask(name: str, mask: object, hidden: torch.Tensor, *, packed: bool, keeps: str) -> None:
    """A mask over the rows of ``hidden``: a bool or integer tensor of shape ``hidden.shape[:-1]``
    ([B, L] padded, [T] packed) on hidden's device; a nonzero entry ``keeps`` its row (the word
    the message uses: "keep", "pool")."""
    check_tensor(name, mask)
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(
            f"{name} must be bool or an integer dtype (1 = {keeps}), got {dtype_name(mask.dtype)}; "
            f"use {name}.bool() for 0/1 masks"
        )
    what = "[T]" if packed else "[B, L]"
    check_ndim(name, mask, hidden.ndim - 1, what)
    expected = tuple(hidden.shape[:-1])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"{name} shape {tuple(mask.shape)} does not match hidden's {what} = {expected} "
            f"(hidden shape {tuple(hidden.shape)})"
        )
    check_same_device(name, mask, "hidden", hidden)


def check_index(
    name: str, index: Optional[torch.Tensor], length: int, layout: str, ref_name: str, ref: torch.Tensor
) -> None:
    """An int64 index vector of shape ``(length,)`` (``layout`` names it: "[B]", "[N]") on the
    device of ``ref``; None passes (optional arguments)."""
    if index is None:
        return
    check_tensor(name, index)
    if index.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype int64, got {dtype_name(index.dtype)}")
    if tuple(index.shape) != (length,):
        raise ValueError(f"{name} must have shape {layout} = ({length},), got {tuple(index.shape)}")
    check_same_device(name, index, ref_name, ref)


class ValueChecks:
    """Checks of tensor values, read back from the device in ONE host sync for all of them.

    Reading a value waits for the device, so a layer that checks several (an index range, a
    scale) adds each as a probe and runs them together. Disabled (``enabled=False``, or under
    torch.compile, which cannot read values) it reads and checks nothing.

    Example:
        >>> checks = ValueChecks()
        >>> checks.index_range("pos_index", torch.tensor([0, 3]), 4)
        >>> checks.run()  # one read; raises if a value is out of range
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and not torch.compiler.is_compiling()
        self._probes: list[torch.Tensor] = []
        self._checks: list[tuple[int, Callable[..., None]]] = []

    def add(self, probes: Sequence[torch.Tensor], check: Callable[..., None]) -> None:
        """At :meth:`run`, call ``check(*values)`` with the probes' (0-dim tensors) values as floats."""
        if self.enabled:
            self._probes += [p.detach().reshape(()) for p in probes]
            self._checks.append((len(probes), check))

    def index_range(self, name: str, index: Optional[torch.Tensor], high: int, note: str = "") -> None:
        """Every value of ``index`` in [0, N) with N = ``high``; ``note`` follows the range in the message."""
        if index is None or index.numel() == 0:
            return

        def check(lo: float, hi: float) -> None:
            if lo < 0 or hi >= high:
                raise ValueError(
                    f"{name} values must be in [0, N) = [0, {high}){note}, got {int(lo if lo < 0 else hi)}"
                )

        lo_hi = torch.aminmax(index)
        self.add((lo_hi.min, lo_hi.max), check)

    def run(self) -> None:
        """Read every probe (one device-to-host copy) and run the checks in the order added."""
        if not self._probes:
            return
        device = self._probes[0].device
        values = torch.stack([p.to(device=device, dtype=torch.float64) for p in self._probes]).tolist()
        for count, check in self._checks:
            check(*values[:count])
            values = values[count:]
