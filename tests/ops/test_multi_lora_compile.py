"""The multi-LoRA Triton kernels compile for the H100 (sm_90) down to a cubin, without a GPU.

The interpreter accepts code the GPU compiler rejects (types differing between branches, dot
shapes, layouts), so CPU CI builds one variant of every code path ahead of time with Triton's
bundled ptxas (``quick``); `python tests/ops/compile_multi_lora_sm90.py` builds every autotune
config. Runs in a subprocess because this test process has TRITON_INTERPRET=1 set.
"""

import pytest

pytest.importorskip("triton")
from tests.ops._common import cpu_only_compile, run_compile_script  # noqa: E402


@cpu_only_compile
def test_multi_lora_kernels_compile_for_sm90_without_spills():
    # Each code path once, the largest rank class (R = 128) in bf16 and fp32 included: aligned
    # launches without register spills (fp32 once spilled up to 77 KB a thread at R = 128).
    compiled, stdout = run_compile_script("compile_multi_lora_sm90.py", "quick")
    assert len(compiled) == 11, stdout
    aligned = [line for line in compiled if " aligned |" in line]
    assert len(aligned) == 9 and all(" spills 0/0 B " in line for line in aligned), stdout
