"""Compile the masked-mean Triton kernels for the H100 (sm_90) down to a cubin, without a GPU.

Run as a script (`python tests/ops/compile_masked_mean_sm90.py [fwd|bwd ...]`) in a process where
TRITON_INTERPRET is unset: in interpreter mode @triton.jit returns functions that cannot be
compiled. Every variant must compile without register spills (``sm90_common.compile_checked``);
aligned ones must use 16-byte accesses. Prints one line per compiled variant with its resources;
exits non-zero on the first failure.
"""

import sys

from sm90_common import aligned, compile_checked  # a sibling when run as a script

from latentembed.bench.sm90 import jit_function
from latentembed.ops.masked_mean import triton as mm

LAYOUTS = {"padded-mask": (True, False), "padded-nomask": (False, False), "packed": (False, True)}


def masked_mean_variants(kind: str):
    """(name, kernel, signature, constexprs, attrs, num_warps) for every dtype, layout and config:
    each config specialised as a contiguous aligned launch, plus one generic (strided) build."""
    kernel = mm._masked_mean_fwd_kernel if kind == "fwd" else mm._masked_mean_bwd_kernel
    # The runtime arguments, read off the kernel: first the input, mask, cu_seqlens and output
    # pointers, then sizes and strides.
    names = [p.name for p in jit_function(kernel).params if not p.is_constexpr]
    unit_strides = ["stride_hd", "stride_ml"] if kind == "fwd" else ["stride_ml"]
    # bf16 -> fp32: the forward with out_dtype=float32 (the NV-Embed block's residual mean) and
    # its backward, which reads the fp32 gradient and writes bf16.
    for dtype in ("bf16", "fp16", "fp32", "bf16->fp32"):
        # Every autotune config for bf16 (the benchmarked dtype), the first for the others.
        configs = mm.GPU_CONFIGS if dtype == "bf16" else mm.GPU_CONFIGS[:1]
        data, _, pooled = dtype.partition("->")
        pooled = pooled or data
        for layout, (has_mask, varlen) in LAYOUTS.items():
            if "->" in dtype and layout != "packed":
                continue
            signature = {n: "i64" for n in names}
            first, last = (data, pooled) if kind == "fwd" else (pooled, data)
            signature.update({names[0]: "*" + first, names[3]: "*" + last, "mask_ptr": "*u8", "cu_ptr": "*i32"})
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
            # The bandwidth-bound accesses must be 16-byte vectors on aligned inputs.
            wide = ("ld.global.v4" if kind == "fwd" else "st.global.v4") if name.endswith("aligned") else ""
            compile_checked(name, kernel, signature, constexprs, attrs, warps, 3, wide_access=wide)


if __name__ == "__main__":
    main(sys.argv[1:] or ["fwd", "bwd"])
