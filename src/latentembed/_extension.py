"""Loading the optional compiled CUDA extension ``latentembed._C``.

The extension only registers CUDA implementations of ops whose schemas are defined in Python
(TORCH_LIBRARY_IMPL), so it has no Python module init: it is loaded with
``torch.ops.load_library`` rather than imported. It is loaded once, when latentembed is
imported, so that backend selection only reads a module constant: torch.compile traces that
without a graph break, where a file-system lookup would break the graph.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch


def extension_path() -> Optional[str]:
    spec = importlib.util.find_spec("latentembed._C")
    return spec.origin if spec is not None else None


def _load() -> Optional[str]:
    path = extension_path()
    if path is None:
        return (
            "the CUDA extension latentembed._C is not built (install with a CUDA build of "
            "torch and nvcc on the PATH, or LATENTEMBED_BUILD_CUDA=1)"
        )
    try:
        torch.ops.load_library(path)
    except OSError as e:
        return f"the CUDA extension {path} failed to load: {e}"
    return None


_UNAVAILABLE: Optional[str] = _load()


def extension_unavailable() -> Optional[str]:
    """``None`` when the extension is loaded, else why it is not."""
    return _UNAVAILABLE


def load_extension() -> None:
    """Raise with the reason when the extension is not loaded."""
    if _UNAVAILABLE is not None:
        raise RuntimeError(_UNAVAILABLE)
