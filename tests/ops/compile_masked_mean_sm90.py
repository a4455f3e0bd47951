"""Compile every Triton kernel of latentembed for the H100 (sm_90) down to a cubin, without a GPU.

Run as a script (`python tests/ops/compile_masked_mean_sm90.py [fwd|bwd ...]`) in a process where
TRITON_INTERPRET is unset: in interpreter mode @triton.jit returns functions that cannot be
compiled. Prints one line per compiled variant; exits non-zero on the first failure.
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET to compile kernels"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from latentembed.ops.masked_mean import triton as mm  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
LAYOUTS = {"padded-mask": (True, False), "padded-nomask": (False, False), "packed": (False, True)}


def aligned(signature: dict, constexprs: dict, unit_strides) -> tuple:
    """Specialise like a launch on contiguous tensors whose sizes are multiples of 16: Triton then
    turns unit strides into constants and marks pointers and ints as 16-divisible, which is
    what lets it emit 16-byte vector accesses."""
    signature, constexprs = dict(signature), dict(constexprs)
    for name in unit_strides:
        signature[name], constexprs[name] = "constexpr", 1
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(signature.items()) if t != "constexpr"}
    return signature, constexprs, attrs


def masked_mean_variants(kind: str):
    """(name, kernel, signature, constexprs, attrs, num_warps) for every dtype, layout and config:
    each config specialised as a contiguous aligned launch, plus one generic (strided) build."""
    kernel = mm._masked_mean_fwd_kernel if kind == "fwd" else mm._masked_mean_bwd_kernel
    # The runtime arguments, read off the kernel: first the input, mask, cu_seqlens and output
    # pointers, then sizes and strides.
    names = [p.name for p in kernel.fn.params if not p.is_constexpr]
    unit_strides = ["stride_hd", "stride_ml"] if kind == "fwd" else ["stride_ml"]
    for dtype in ("bf16", "fp16", "fp32"):
        # Every autotune config for bf16 (the benchmarked dtype), the first for the others.
        configs = mm.GPU_CONFIGS if dtype == "bf16" else mm.GPU_CONFIGS[:1]
        for layout, (has_mask, varlen) in LAYOUTS.items():
            signature = {n: "i64" for n in names}
            signature.update({names[0]: "*" + dtype, names[3]: "*" + dtype, "mask_ptr": "*u8", "cu_ptr": "*i32"})
            flags = {"HAS_MASK": has_mask, "IS_VARLEN": varlen}
            # Absent tensors are passed as None, which Triton specialises as a constexpr.
            if not has_mask:
                flags["mask_ptr"] = None
            if not varlen:
                flags["cu_ptr"] = None
            for i, (block_l, block_d, warps) in enumerate(configs):
                constexprs = {**flags, "BLOCK_L": block_l, "BLOCK_D": block_d}
                sig = {**signature, **{k: "constexpr" for k in constexprs}}
                name = f"masked_mean_{kind} {dtype} {layout} L{block_l}-D{block_d}-w{warps}"
                yield name + " aligned", kernel, *aligned(sig, constexprs, unit_strides), warps
                if i == 0:
                    yield name + " strided", kernel, sig, constexprs, {}, warps


def main(kinds):
    for kind in kinds:
        for name, kernel, signature, constexprs, attrs, warps in masked_mean_variants(kind):
            fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=H100, options={"num_warps": warps})
            ptx = compiled.asm["ptx"]
            assert compiled.asm.get("cubin"), f"{name}: no cubin"
            assert "st.global" in ptx, f"{name}: the kernel stores nothing"
            if name.endswith("aligned"):
                # The bandwidth-bound accesses must be 16-byte vectors on aligned inputs.
                wide = "ld.global.v4" if kind == "fwd" else "st.global.v4"
                assert wide in ptx, f"{name}: no 16-byte {wide} accesses in the PTX"
            print("compiled", name, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["fwd", "bwd"])
