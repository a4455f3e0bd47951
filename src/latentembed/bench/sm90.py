"""What a Triton kernel costs on the H100, read from its sm_90 build without a GPU.

Triton compiles for a target it is given (``GPUTarget("cuda", 90, 32)``) down to a cubin with its
bundled ptxas, on any machine. ptxas reports, per kernel, the registers a thread uses, the bytes
it spills to local memory (stores and loads), the stack frame; Triton's metadata gives the shared
memory a block needs. From those and the launch's warps, :func:`occupancy` computes how many
blocks fit on one SM (the H100's per-SM limits below). The sm_90 compile checks
(``tests/ops/compile_*_sm90.py``) assert zero spills with these numbers, and the benchmarks'
performance model (:mod:`latentembed.bench.model`) prints them.

Only usable in a process where ``TRITON_INTERPRET`` is unset (the interpreter replaces
``@triton.jit`` functions by Python ones that cannot be compiled).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Optional

# H100 SXM (sm_90), per SM: the limits that decide how many blocks are resident at once.
SM90_SMS = 132
SM90_REGISTERS_PER_SM = 65536
SM90_MAX_WARPS_PER_SM = 64
SM90_MAX_BLOCKS_PER_SM = 32
SM90_SHARED_PER_SM = 233472  # 228 KiB, of which one block may take 227 KiB ...
SM90_MAX_SHARED_PER_BLOCK = 232448
SM90_SHARED_RESERVED_PER_BLOCK = 1024  # ... and each resident block reserves 1 KiB
_REGISTER_ALLOCATION_UNIT = 256  # registers are given to a warp in units of 256


@dataclass
class KernelResources:
    """One compiled kernel variant: what ptxas and Triton report, and the occupancy it allows."""

    name: str
    num_warps: int
    num_stages: int
    registers: int  # per thread
    spill_stores: int  # bytes per thread (a GPU run's driver reports one spill count: both)
    spill_loads: int
    stack_bytes: int  # -1 when unknown (read from a loaded kernel)
    shared_bytes: int  # per block
    blocks_per_sm: int
    occupancy: float  # resident warps / 64

    def line(self) -> str:
        return (
            f"regs {self.registers} spills {self.spill_stores}/{self.spill_loads} B stack {self.stack_bytes} B "
            f"smem {self.shared_bytes / 1024:.0f} KiB blocks/SM {self.blocks_per_sm} occupancy {self.occupancy:.0%}"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def occupancy(registers: int, shared_bytes: int, num_warps: int) -> tuple[int, float]:
    """``(blocks per SM, resident warps / 64)`` of a kernel on the H100.

    Example:
        >>> occupancy(registers=128, shared_bytes=0, num_warps=4)  # register-bound: 4 blocks
        (4, 0.25)
        >>> occupancy(registers=255, shared_bytes=98304, num_warps=8)
        (1, 0.125)
    """
    per_warp = -(-registers * 32 // _REGISTER_ALLOCATION_UNIT) * _REGISTER_ALLOCATION_UNIT
    by_registers = SM90_REGISTERS_PER_SM // max(1, per_warp * num_warps)
    by_shared = SM90_SHARED_PER_SM // (shared_bytes + SM90_SHARED_RESERVED_PER_BLOCK)
    by_warps = SM90_MAX_WARPS_PER_SM // num_warps
    blocks = min(by_registers, by_shared, by_warps, SM90_MAX_BLOCKS_PER_SM)
    return blocks, blocks * num_warps / SM90_MAX_WARPS_PER_SM


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> tuple[int, int, int, int]:
    """``(registers, stack bytes, spill store bytes, spill load bytes)`` from ``ptxas -v`` output
    of one kernel (Triton compiles one kernel per PTX module).

    Example:
        >>> parse_ptxas_log("ptxas info : 16 bytes stack frame, 8 bytes spill stores, 8 bytes spill "
        ...                 "loads\\nptxas info : Used 255 registers, used 1 barriers")
        (255, 16, 8, 8)
    """
    used = _PTXAS_USED.search(log)
    spills = _PTXAS_SPILLS.search(log)
    if used is None or spills is None:
        raise ValueError(f"no register / spill report in the ptxas log:\n{log}")
    return int(used.group(1)), int(spills.group(1)), int(spills.group(2)), int(spills.group(3))


def jit_function(kernel: Any) -> Any:
    """The ``triton.JITFunction`` under ``@triton.autotune`` / ``@triton.heuristics`` wrappers."""
    import triton

    found = kernel
    while not isinstance(found, triton.runtime.JITFunction) and hasattr(found, "fn"):
        found = found.fn
    if not isinstance(found, triton.runtime.JITFunction):
        raise TypeError(f"{kernel!r} is not a compiled Triton kernel (is TRITON_INTERPRET set?)")
    return found


def compile_sm90(
    name: str,
    fn: Any,
    signature: dict,
    constexprs: dict,
    attrs: Optional[dict] = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> tuple[Any, KernelResources]:
    """Compile a ``@triton.jit`` function (or an autotuned one) for the H100; return the compiled
    kernel and its :class:`KernelResources`. ``signature``, ``constexprs`` and ``attrs`` as
    ``triton.compiler.ASTSource`` takes them. Bypasses Triton's cache, so ptxas always runs and
    its report is read."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_sm90 needs TRITON_INTERPRET unset (the interpreter cannot compile kernels)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = jit_function(fn)
    src = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs or {})
    knobs = triton.knobs
    log = io.StringIO()
    with (
        knobs.nvidia.scope(),
        knobs.compilation.scope(),
        contextlib.redirect_stdout(log),
    ):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        compiled = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
        )
    registers, stack, stores, loads = parse_ptxas_log(log.getvalue())
    shared = int(compiled.metadata.shared)
    blocks, occ = occupancy(registers, shared, num_warps)
    return compiled, KernelResources(name, num_warps, num_stages, registers, stores, loads, stack, shared, blocks, occ)


def launched_resources(kernels: Optional[list] = None) -> list:
    """KernelResources (as dicts) of every Triton kernel compiled and loaded in this process: what
    a GPU run actually launched, with the driver's register and spill counts (``n_regs``,
    ``n_spills``). ``kernels``: the ``@triton.jit`` / autotuned objects to look at (default:
    every kernel module of latentembed.ops that is imported)."""
    if kernels is None:
        kernels = _imported_kernels()
    rows = []
    for kernel in kernels:
        jit = jit_function(kernel)
        for caches in getattr(jit, "device_caches", {}).values():
            for compiled in caches[0].values():
                regs = getattr(compiled, "n_regs", None)
                if regs is None:  # compiled but never loaded
                    continue
                meta = compiled.metadata
                warps, stages = getattr(meta, "num_warps", 4), getattr(meta, "num_stages", 0)
                shared = int(getattr(meta, "shared", 0))
                blocks, occ = occupancy(regs, shared, warps)
                spills = int(compiled.n_spills)
                res = KernelResources(jit.__name__, warps, stages, regs, spills, spills, -1, shared, blocks, occ)
                rows.append(res.as_dict())
    return rows


def _imported_kernels() -> list:
    import sys

    import triton

    found = []
    for name, module in list(sys.modules.items()):
        if not (name.startswith("latentembed.ops.") and name.endswith("triton")) or module is None:
            continue
        for value in vars(module).values():
            if isinstance(value, (triton.runtime.JITFunction, triton.runtime.Autotuner, triton.runtime.Heuristics)):
                found.append(value)
    return found
