"""The latent-attention Triton kernels compile for the H100 (sm_90) on a machine without a GPU.

The interpreter accepts code the GPU compiler rejects (dot shapes, layouts, casts), so CPU CI
builds the kernels ahead of time with Triton's bundled ptxas, in a subprocess because this test
process has TRITON_INTERPRET=1 set; it also checks that the half-precision dots use tensor cores.
"""

import pytest

pytest.importorskip("triton")
from tests.ops._common import cpu_only_compile, run_compile_script  # noqa: E402


@cpu_only_compile
def test_latent_attention_kernels_compile_for_sm90_without_spills():
    # Every shipped configuration of every kernel (bf16, R = 512 and 16; fp32 score and dM tiles).
    compiled, stdout = run_compile_script("compile_latent_attention_sm90.py")
    names = {line.split()[1] for line in compiled}
    assert names == {"ln_stats", "scores_softmax", "softmax_bwd", "dm", "ln_bwd", "geglu_fwd", "geglu_bwd"}, stdout
    assert len(compiled) >= 25, stdout
    assert all(" spills 0/0 B " in line for line in compiled), stdout
