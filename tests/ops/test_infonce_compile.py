"""The infonce_lse Triton kernels compile for the H100 (sm_90) to a cubin with tensor-core
instructions, on a machine without a GPU (the interpreter accepts code the GPU compiler
rejects). Runs in a subprocess because this process has TRITON_INTERPRET=1 set."""

import pytest

pytest.importorskip("triton")
from tests.ops._common import cpu_only_compile, run_compile_script  # noqa: E402


@cpu_only_compile
def test_contrastive_kernels_compile_for_sm90():
    compiled, stdout = run_compile_script("compile_infonce_sm90.py")
    assert len(compiled) == 5, stdout
