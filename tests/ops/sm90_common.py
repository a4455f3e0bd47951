"""Shared by the tests/ops/compile_*_sm90.py scripts: the H100 target, the specialisation of an
aligned launch, and one checked compile that reads ptxas' resource report.

Imported as a sibling module (the scripts run as ``python tests/ops/compile_<op>_sm90.py`` in a
process where TRITON_INTERPRET is unset).
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET to compile kernels"

from triton.backends.compiler import GPUTarget  # noqa: E402

from latentembed.bench.sm90 import SM90_MAX_SHARED_PER_BLOCK, KernelResources, compile_sm90  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
# Report every violation and go on instead of stopping at the first (for surveys of configs):
# `SM90_REPORT_ONLY=1 python tests/ops/compile_<op>_sm90.py ...`.
REPORT_ONLY = os.environ.get("SM90_REPORT_ONLY", "0") == "1"


def aligned(signature: dict, constexprs: dict, unit_strides) -> tuple:
    """Specialise like a launch on contiguous tensors whose sizes are multiples of 16: Triton then
    turns unit strides into constants and marks pointers and ints as 16-divisible, which is
    what lets it emit 16-byte vector accesses."""
    signature, constexprs = dict(signature), dict(constexprs)
    for name in unit_strides:
        signature[name], constexprs[name] = "constexpr", 1
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(signature.items()) if t != "constexpr"}
    return signature, constexprs, attrs


def compile_checked(
    name: str,
    kernel,
    signature: dict,
    constexprs: dict,
    attrs: dict,
    num_warps: int,
    num_stages: int,
    *,
    tensor_cores: bool = False,
    wide_access: str = "",
    spill_free: bool = True,
) -> KernelResources:
    """Compile one variant for the H100 and check it; print ``compiled <name> | <resources>``.

    Always: a cubin exists, the kernel stores something, its shared memory fits one block's
    227 KiB (Triton itself checks only at launch). ``spill_free``: ptxas reports no spill stores
    or loads (a configuration that spills cannot win: it is pruned from the shipped lists).
    ``tensor_cores``: half-precision dots use ``mma`` / ``wgmma``. ``wide_access``: an instruction
    such as ``ld.global.v4`` (16-byte accesses of bandwidth-bound kernels) must appear."""
    compiled, res = compile_sm90(name, kernel, signature, constexprs, attrs, num_warps, num_stages)
    ptx = compiled.asm["ptx"]
    problems = []
    if not compiled.asm.get("cubin"):
        problems.append("no cubin")
    if "st.global" not in ptx:
        problems.append("the kernel stores nothing")
    if res.shared_bytes > SM90_MAX_SHARED_PER_BLOCK:
        problems.append(f"needs {res.shared_bytes} B of shared memory > {SM90_MAX_SHARED_PER_BLOCK}")
    if spill_free and (res.spill_stores or res.spill_loads):
        problems.append(
            f"spills {res.spill_stores} B (stores) / {res.spill_loads} B (loads) a thread at {res.registers} "
            "registers: prune this configuration"
        )
    if tensor_cores and "mma" not in ptx:
        problems.append("no tensor-core (mma / wgmma) instruction in the PTX")
    if wide_access and wide_access not in ptx:
        problems.append(f"no 16-byte {wide_access} accesses in the PTX")
    if problems and not REPORT_ONLY:
        raise AssertionError(f"{name}: " + "; ".join(problems))
    if problems:
        print("FAILED", name, "|", res.line(), "|", "; ".join(problems), file=sys.stderr, flush=True)
    else:
        print("compiled", name, "|", res.line(), flush=True)
    return res
