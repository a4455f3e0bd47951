"""Every Triton kernel compiles for the H100 (sm_90) down to a cubin, on a machine without a GPU.

The interpreter runs kernels on CPU but accepts code that the GPU compiler rejects (types that
differ between branches, unsupported casts, layouts...). Compiling ahead of time for sm_90 with
Triton's bundled ptxas catches those in CPU CI, for every dtype, layout and autotune config.
The compile runs in a subprocess because this test process has TRITON_INTERPRET=1 set.
"""

import pytest

pytest.importorskip("triton")
from latentembed.ops.masked_mean.triton import GPU_CONFIGS  # noqa: E402
from tests.ops._common import cpu_only_compile, run_compile_script  # noqa: E402


@cpu_only_compile
@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_masked_mean_kernels_compile_for_sm90(kind):
    compiled, stdout = run_compile_script("compile_masked_mean_sm90.py", kind)
    # 3 layouts x (bf16: every config aligned + 1 strided; fp16, fp32: 1 aligned + 1 strided),
    # and bf16 with an fp32 mean (out_dtype), packed: 1 aligned + 1 strided. No register spills.
    assert len(compiled) == 3 * (len(GPU_CONFIGS) + 5) + 2, stdout
    assert all(" spills 0/0 B " in line for line in compiled), stdout
