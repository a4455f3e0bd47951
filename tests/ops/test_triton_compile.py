"""Every Triton kernel compiles for the H100 (sm_90) down to a cubin, on a machine without a GPU.

The interpreter runs kernels on CPU but accepts code that the GPU compiler rejects (types that
differ between branches, unsupported casts, layouts...). Compiling ahead of time for sm_90 with
Triton's bundled ptxas catches those in CPU CI, for every dtype, layout and autotune config.
The compile runs in a subprocess because this test process has TRITON_INTERPRET=1 set.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from latentembed.ops.masked_mean.triton import GPU_CONFIGS  # noqa: E402

SCRIPT = Path(__file__).with_name("compile_triton_sm90.py")


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="on a GPU machine the other tests compile and run these kernels for the real device",
)
@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_masked_mean_kernels_compile_for_sm90(kind):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), kind], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    compiled = [line for line in result.stdout.splitlines() if line.startswith("compiled ")]
    # 3 layouts x (bf16: every config aligned + 1 strided; fp16, fp32: 1 aligned + 1 strided)
    assert len(compiled) == 3 * (len(GPU_CONFIGS) + 5), result.stdout
