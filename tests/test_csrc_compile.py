"""The CUDA sources compile on a CPU-only machine: CI catches C++ errors without a GPU.

Every csrc/**/*.cu file is compiled alone with nvcc for sm_90 (the kernels include no torch
header, so no CUDA build of torch is needed), and every csrc/**/*.cpp file (each op's bindings.cpp
and host code such as latent_cross_attention_host.cpp) gets a syntax-only g++ pass against the
installed torch's headers plus the CUDA toolkit's. Nothing here runs a kernel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = sorted(CSRC.glob("**/*.cu"))
KERNEL_SOURCES = sorted([*CU_FILES, *CSRC.glob("**/*.cuh")])
CPP_FILES = sorted(CSRC.glob("**/*.cpp"))  # what setup.py compiles with the C++ compiler
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](ATen|c10|torch)/', re.MULTILINE)

# BuildExtension compiles .cu files with these (no implicit half/bfloat16 conversions): use
# them here too, so code that only compiles without them fails in CI rather than at install.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
TIMEOUT_S = 300


def _find_nvcc() -> Optional[str]:
    candidates = [shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _cuda_include_dir() -> Optional[str]:
    """The toolkit's include dir (it holds cuda_runtime_api.h), or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = _find_nvcc()
    if nvcc is not None:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    roots.append("/usr/local/cuda")
    for root in roots:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h")):
            return os.path.join(root, "include")
    return None


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    if result.returncode != 0:
        pytest.fail(f"compile failed (exit {result.returncode}): {' '.join(cmd)}\n{result.stdout}{result.stderr}")


def test_kernel_sources_exist():
    assert CU_FILES, f"no .cu files under {CSRC}"
    assert CPP_FILES, f"no .cpp bindings under {CSRC}"
    missing = sorted(
        {str(p.parent.relative_to(CSRC)) for p in CU_FILES}
        - {str(p.parent.relative_to(CSRC)) for p in CPP_FILES if p.name == "bindings.cpp"}
    )
    assert not missing, f"op folders without bindings.cpp: {missing}"


@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=[str(p.relative_to(CSRC)) for p in KERNEL_SOURCES])
def test_kernel_sources_include_no_torch_header(source: Path):
    # The .cu files compile alone with plain nvcc (CPU CI has no CUDA build of torch); torch glue
    # belongs in the .cpp files.
    found = TORCH_INCLUDE.findall(source.read_text())
    assert not found, f"{source.relative_to(CSRC)} includes torch headers ({', '.join(found)})"


@pytest.mark.parametrize("cu_file", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cu_compiles_with_nvcc(cu_file: Path, tmp_path: Path):
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    _run(
        [
            nvcc,
            "-arch=sm_90",
            "-std=c++17",
            *TORCH_NVCC_DEFINES,
            "-c",
            str(cu_file),
            "-o",
            str(tmp_path / (cu_file.stem + ".o")),
        ]
    )


@pytest.mark.parametrize("cpp_file", CPP_FILES, ids=[str(p.relative_to(CSRC)) for p in CPP_FILES])
def test_cpp_syntax(cpp_file: Path, tmp_path: Path):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found on the PATH")
    cuda_include = _cuda_include_dir()
    if cuda_include is None:
        pytest.skip("CUDA headers not found (cuda_runtime_api.h under $CUDA_HOME or /usr/local/cuda)")
    pytest.importorskip("torch")
    from torch.utils.cpp_extension import include_paths

    torch_includes = include_paths()
    if not any(os.path.isfile(os.path.join(d, "c10", "cuda", "CUDAGuard.h")) for d in torch_includes):
        pytest.skip("the installed torch ships no c10/cuda headers")
    # CPU wheels ship the c10/cuda headers but not this CMake-generated one; the CUDA build's
    # version only defines the shared-library export macro.
    generated = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")
    stub_dirs = []
    if not any(os.path.isfile(os.path.join(d, generated)) for d in torch_includes):
        stub = tmp_path / "stub" / generated
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        stub_dirs.append(str(tmp_path / "stub"))
    includes = [f"-I{d}" for d in [*torch_includes, cuda_include, str(CSRC), *stub_dirs]]
    _run([gxx, "-fsyntax-only", "-std=c++17", *includes, str(cpp_file)])
