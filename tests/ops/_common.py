"""Parameter lists and the sm_90 compile-script runner shared by the op tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"

# The kernel backends an op test runs against its reference (the reference is the spec).
KERNEL_BACKENDS = [
    pytest.param("triton", id="triton"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.cuda_ext]),
]

# bf16 cases that run on the GPU only, skipped with a reason on CPU (the Triton interpreter's
# bf16 is not the GPU's: see each test file for why it matters there).
BF16_ON_GPU = pytest.mark.skipif(not HAS_GPU, reason="bf16 Triton kernels are tested on the GPU")


def dtype_params(bf16_marks=()) -> list:
    """fp32, fp16 and bf16 parameters (ids fp32, fp16, bf16); ``bf16_marks`` go on bf16 only."""
    return [
        pytest.param(torch.float32, id="fp32"),
        pytest.param(torch.float16, id="fp16"),
        pytest.param(torch.bfloat16, id="bf16", marks=bf16_marks),
    ]


# The sm_90 compile tests check what the interpreter cannot; on a GPU the real kernels run.
cpu_only_compile = pytest.mark.skipif(
    HAS_GPU,
    reason="on a GPU machine the other tests compile and run these kernels for the real device",
)


def run_compile_script(script: str, *args: str) -> tuple[list[str], str]:
    """Run tests/ops/<script> with ``args`` and return its ``compiled ...`` lines and stdout.

    The script runs in a subprocess without TRITON_INTERPRET (which this test process sets), so
    Triton compiles for the GPU; a non-zero exit fails the test with the script's output.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = Path(__file__).with_name(script)
    result = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    compiled = [line for line in result.stdout.splitlines() if line.startswith("compiled ")]
    return compiled, result.stdout
