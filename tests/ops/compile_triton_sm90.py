"""Compile every Triton kernel of latentembed for the H100 (sm_90) down to a cubin, without a GPU.

Run as a script (`python tests/ops/compile_triton_sm90.py [fwd|bwd ...]`) in a process where
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


def compile_for_h100(jit_fn, signature: dict, constexprs: dict, num_warps: int):
    fn = jit_fn.fn if isinstance(jit_fn, triton.runtime.Autotuner) else jit_fn
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=H100,
                          options={"num_warps": num_warps})


def masked_mean_variants(kind: str):
    """(name, kernel, signature, constexprs, num_warps) for every dtype, layout and config."""
    kernel = mm._masked_mean_fwd_kernel if kind == "fwd" else mm._masked_mean_bwd_kernel
    if kind == "fwd":
        names = ["h_ptr", "mask_ptr", "cu_ptr", "out_ptr", "L", "D", "stride_hb", "stride_hl",
                 "stride_hd", "stride_mb", "stride_ml", "stride_ob"]
    else:
        names = ["grad_out_ptr", "mask_ptr", "cu_ptr", "grad_h_ptr", "L", "D", "stride_gob",
                 "stride_mb", "stride_ml", "stride_gb", "stride_gl"]
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
            for block_l, block_d, warps in configs:
                constexprs = {**flags, "BLOCK_L": block_l, "BLOCK_D": block_d}
                signature.update({k: "constexpr" for k in constexprs})
                name = f"masked_mean_{kind} {dtype} {layout} L{block_l}-D{block_d}-w{warps}"
                yield name, kernel, dict(signature), constexprs, warps


def main(kinds):
    for kind in kinds:
        for name, kernel, signature, constexprs, warps in masked_mean_variants(kind):
            compiled = compile_for_h100(kernel, signature, constexprs, warps)
            assert compiled.asm.get("cubin"), f"{name}: no cubin"
            assert "st.global" in compiled.asm["ptx"], f"{name}: the kernel stores nothing"
            print("compiled", name, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["fwd", "bwd"])
