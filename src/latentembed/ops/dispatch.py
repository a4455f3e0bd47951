"""Backend declarations and selection, shared by every op.

Each op lists its backends fastest first. A backend declares where it can run (devices,
dtypes, a global availability check such as "the extension is built" and a per-call check
such as "D must be even") and says *why* it cannot run when it cannot. ``backend="auto"``
takes the first backend that can run and that is meant for automatic use on the tensors'
device; an explicit backend that cannot run raises :class:`BackendUnavailableError` with
every reason, as does ``auto`` when nothing fits.

The environment variable ``LATENTEMBED_BACKEND`` replaces ``"auto"`` (an explicit argument
in code still wins), which is handy to force the reference everywhere while debugging.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .._extension import extension_unavailable

BACKEND_NAMES = ("auto", "reference", "triton", "cuda")
ENV_VAR = "LATENTEMBED_BACKEND"


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend (or, for ``auto``, every backend) cannot run."""


@dataclass(frozen=True)
class Backend:
    """What one implementation of an op supports.

    Attributes:
        name: one of ``reference``, ``triton``, ``cuda``.
        devices: device types it runs on (``"cpu"``, ``"cuda"``).
        dtypes: floating dtypes of the main input it accepts.
        auto_devices: device types on which ``auto`` may pick it (the Triton interpreter
            runs on CPU for testing but is far too slow to be picked automatically).
        available: returns ``None`` when the backend can be used at all in this process,
            else the reason it cannot (package missing, extension not built, ...).
        supports: per-call check on the op's arguments; ``None`` or the reason it cannot run.
    """

    name: str
    devices: frozenset
    dtypes: frozenset
    auto_devices: frozenset = frozenset()
    available: Callable[[], Optional[str]] = lambda: None
    supports: Optional[Callable[..., Optional[str]]] = field(default=None)

    def why_not(self, device: torch.device, dtype: torch.dtype, *args, **kwargs) -> Optional[str]:
        """``None`` if this backend can run on these inputs, else a one-line reason."""
        if device.type not in self.devices:
            return f"runs on {sorted(self.devices)}, got device '{device.type}'"
        if dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in self.dtypes))
            return f"supports dtypes [{names}], got {str(dtype).replace('torch.', '')}"
        reason = self.available()
        if reason is None and self.supports is not None:
            reason = self.supports(*args, **kwargs)
        return reason


def requested_backend(backend: str) -> str:
    """Apply the environment override and check the name."""
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        source = f"environment variable {ENV_VAR}"
    else:
        source = "argument backend"
    if backend not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {backend!r}")
    return backend


def select_backend(
    op: str,
    backends: Sequence[Backend],
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    *args,
    **kwargs,
) -> Backend:
    """Pick the backend that runs ``op`` on these inputs, or raise with every reason.

    ``args``/``kwargs`` are passed to each backend's ``supports`` check.
    """
    name = requested_backend(backend)
    reasons = []
    for candidate in backends:
        if name != "auto" and candidate.name != name:
            continue
        if name == "auto" and device.type not in candidate.auto_devices:
            reasons.append(f"{candidate.name}: not used automatically on '{device.type}'")
            continue
        reason = candidate.why_not(device, dtype, *args, **kwargs)
        if reason is None:
            return candidate
        reasons.append(f"{candidate.name}: {reason}")
    if name != "auto" and not reasons:
        reasons.append(f"{name}: {op} has no such backend")
    raise BackendUnavailableError(
        f"{op}: no backend can run with backend={name!r} on device '{device.type}', "
        f"dtype {str(dtype).replace('torch.', '')}:\n  " + "\n  ".join(reasons)
    )


def triton_unavailable() -> Optional[str]:
    """Why Triton kernels cannot run in this process, or ``None``."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton is a hard requirement
        return f"triton is not installed ({e})"
    return None


def triton_interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context that makes ``tensor``'s CUDA device the current one; a null context elsewhere.

    Triton launches on the *current* device (and compiles and autotunes for it), not on the
    device of the pointers it is given: tensors on ``cuda:1`` with ``cuda:0`` current would run
    on the wrong GPU. Every Triton launcher enters this around its launches, as the CUDA
    extension's ops enter a ``CUDAGuard``.
    """
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def triton_devices() -> frozenset:
    """Triton compiles for CUDA; in interpreter mode it also accepts CPU tensors."""
    return frozenset({"cuda", "cpu"}) if triton_interpreting() else frozenset({"cuda"})


# Declarations shared by the ops' BACKENDS lists (each op keeps its own order).

#: Dtypes the Triton and CUDA kernels take; the references also take float64.
KERNEL_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
_CUDA_ONLY = frozenset({"cuda"})


def cuda_unavailable() -> Optional[str]:
    """Why the compiled extension's ops cannot run in this process, or ``None``."""
    if not torch.cuda.is_available():
        return "torch has no CUDA device"
    return extension_unavailable()


def reference_backend(dtypes: frozenset = KERNEL_DTYPES | {torch.float64}) -> Backend:
    """The plain-PyTorch backend: any device, picked by ``auto`` when nothing faster fits."""
    both = frozenset({"cpu", "cuda"})
    return Backend("reference", devices=both, dtypes=dtypes, auto_devices=both)


def triton_backend(
    dtypes: frozenset = KERNEL_DTYPES,
    supports: Optional[Callable[..., Optional[str]]] = None,
    auto: bool = True,
) -> Backend:
    """The Triton backend (CPU too under the interpreter); ``auto`` picks it on CUDA only."""
    return _kernel_backend(
        "triton", devices=triton_devices(), available=triton_unavailable, dtypes=dtypes, supports=supports, auto=auto
    )


def cuda_backend(
    dtypes: frozenset = KERNEL_DTYPES,
    supports: Optional[Callable[..., Optional[str]]] = None,
    auto: bool = True,
) -> Backend:
    """The compiled extension's backend; ``auto=False`` keeps ``auto`` from picking it."""
    return _kernel_backend(
        "cuda", devices=_CUDA_ONLY, available=cuda_unavailable, dtypes=dtypes, supports=supports, auto=auto
    )


def _kernel_backend(
    name: str,
    *,
    devices: frozenset,
    available: Callable[[], Optional[str]],
    dtypes: frozenset,
    supports: Optional[Callable[..., Optional[str]]],
    auto: bool,
) -> Backend:
    """A GPU-kernel backend: ``auto`` may pick it on CUDA devices only, or never (``auto=False``)."""
    return Backend(
        name,
        devices=devices,
        dtypes=dtypes,
        auto_devices=_CUDA_ONLY if auto else frozenset(),
        available=available,
        supports=supports,
    )
