"""`python -m latentembed info`: versions, GPU, extension and the backend each op would use."""

from __future__ import annotations

import os
import platform

import torch

from ._extension import extension_path, extension_unavailable
from .ops import OPS
from .ops.dispatch import ENV_VAR, BackendUnavailableError, select_backend, triton_interpreting


def info() -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    has_gpu = torch.cuda.is_available()
    ext_reason = extension_unavailable() if has_gpu else None
    if has_gpu:
        ext = f"loaded from {extension_path()}" if ext_reason is None else f"unavailable: {ext_reason}"
    else:
        ext = f"built at {extension_path()}" if extension_path() else "not built (needs a CUDA torch and nvcc)"
    lines = [
        f"python        {platform.python_version()}",
        f"torch         {torch.__version__} (CUDA {torch.version.cuda})",
        f"triton        {triton_version}{' (interpreter mode)' if triton_interpreting() else ''}",
        f"GPU           {torch.cuda.get_device_name() if has_gpu else 'none'}",
        f"extension     latentembed._C {ext}",
        f"{ENV_VAR}  {os.environ.get(ENV_VAR, '(unset: auto)')}",
        "",
        "backend chosen by backend='auto':",
    ]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if has_gpu else [])
    for op, backends in OPS.items():
        for device in devices:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                try:
                    name = select_backend(op, backends, "auto", device, dtype).name
                except BackendUnavailableError as e:
                    name = f"none ({e})"
                lines.append(f"  {op:<24} {device.type:<5} {str(dtype).replace('torch.', ''):<9} -> {name}")
    return "\n".join(lines)
