"""Optional CUDA extension ``latentembed._C``; all package metadata lives in pyproject.toml.

The extension (csrc/**/*.cpp bindings + csrc/**/*.cu kernels) is built when torch is a CUDA build and nvcc
is found (CUDA_HOME, or nvcc on the PATH). ``LATENTEMBED_BUILD_CUDA=1`` forces the build and
fails with the reasons when it is impossible; ``LATENTEMBED_BUILD_CUDA=0`` skips it. Otherwise a
machine without CUDA (or without torch) gets the pure-Python package, without error.

Architectures: TORCH_CUDA_ARCH_LIST when set, else sm_80 and sm_90 plus sm_90 PTX (which newer
GPUs JIT-compile), rather than torch's default of every architecture it knows.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
ENV_FLAG = "LATENTEMBED_BUILD_CUDA"
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _build_request() -> bool | None:
    """True: must build, False: must not, None: build when possible."""
    value = os.environ.get(ENV_FLAG, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV_FLAG} must be 1, 0 or unset, got {os.environ[ENV_FLAG]!r}")


def _why_no_cuda_build() -> str | None:
    """None when the extension can be built here, else the reason it cannot."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        return f"torch is not importable ({e})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return "nvcc not found (set CUDA_HOME or put nvcc on the PATH)"
    return None


def _cuda_extension_kwargs() -> dict:
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # torch reads the variable when it compiles; it picks every known architecture otherwise.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    # Each op folder holds its kernels (.cu, no torch headers) and its torch-side .cpp files:
    # bindings.cpp, plus host code where the op has some (latent_cross_attention_host.cpp).
    sources = sorted(
        os.path.relpath(path, ROOT)
        for ext in ("cpp", "cu")
        for path in glob.glob(os.path.join(ROOT, "csrc", "**", f"*.{ext}"), recursive=True)
    )
    extension = CUDAExtension(
        name="latentembed._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            # The C++ standard for the bindings is left to torch: its headers need C++17 or
            # C++20 depending on the version, and BuildExtension adds the right one.
            "cxx": ["-O3"],
            # No --use_fast_math: the mean divides by the count exactly, like the reference.
            "nvcc": ["-O3", "-std=c++17", "-lineinfo"],
        },
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


def _setup_kwargs() -> dict:
    request = _build_request()
    if request is False:
        return {}
    reason = _why_no_cuda_build()
    if reason is not None:
        if request:
            raise RuntimeError(f"{ENV_FLAG}=1 but the CUDA extension cannot be built: {reason}")
        print(f"latentembed: skipping the CUDA extension: {reason}", file=sys.stderr)
        return {}
    return _cuda_extension_kwargs()


setup(**_setup_kwargs())
