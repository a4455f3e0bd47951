"""Compile the multi-LoRA Triton kernels for the H100 (sm_90) down to a cubin, without a GPU.

Run as a script (`python tests/ops/compile_multi_lora_sm90.py [fwd|bwd|grad|quick ...]`) with
TRITON_INTERPRET unset. Prints one line per compiled variant; exits non-zero on the first failure.
The full set (every autotune config, dtype and flag combination, ~90 builds) takes minutes on a
2-core machine; ``quick`` (what CPU CI runs) builds one variant of each distinct code path.
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET to compile kernels"

import triton  # noqa: E402
from compile_masked_mean_sm90 import H100, aligned  # noqa: E402  (a sibling when run as a script)
from triton.compiler import ASTSource  # noqa: E402

from latentembed.ops.multi_lora import triton as ml  # noqa: E402
from latentembed.ops.multi_lora.grouping import BLOCK_M  # noqa: E402

DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _signature(kernel, pointers: dict) -> dict:
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    sig = {p.name: "i32" for p in fn.params if not p.is_constexpr}
    sig.update(pointers)
    return sig


def shrink_expand_variants(kind: str):
    """fwd: base added, h stored. bwd: no base, h stored (dA needed) or not, dx stored or not."""
    kernel = ml._shrink_expand_kernel
    modes = [(True, True, True)] if kind == "fwd" else [(False, True, True), (False, False, True), (False, True, False)]
    # Unit strides of contiguous tensors. Forward: x, base, out row-major, W1 = A [T, R, in]
    # (unit along in), W2 = B [T, out, R] (unit along R). Backward: dy, dx row-major, W1 = B
    # read as [T, R, out] (unit along R), W2 = A read as [T, in, R] (unit along in).
    if kind == "fwd":
        unit = ["stride_xk", "stride_bm", "stride_ym", "stride_w1k", "stride_w2r"]
    else:
        unit = ["stride_xk", "stride_ym", "stride_w1r", "stride_w2m"]
    for dtype, ptr in DTYPES.items():
        configs = ml.SHRINK_EXPAND_CONFIGS if dtype == "bf16" else ml.SHRINK_EXPAND_CONFIGS[:1]
        for has_base, store_h, store_y in modes:
            pointers = {n: ptr for n in ("x_ptr", "w1_ptr", "w2_ptr", "base_ptr", "y_ptr")}
            pointers.update(scale_ptr="*fp32", h_ptr="*fp32", rows_ptr="*i64", blocks_ptr="*i32")
            flags = {
                "HAS_BASE": has_base,
                "STORE_H": store_h,
                "STORE_Y": store_y,
                "BLOCK_M": BLOCK_M,
                "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
            }
            if not has_base:
                flags["base_ptr"] = None
            for r_pad in (16, 64):
                for i, (sub_m, bk, bn, split, warps, stages) in enumerate(configs):
                    if r_pad != 16 and i:
                        continue
                    constexprs = {
                        **flags,
                        "R_PAD": r_pad,
                        "SUB_M": sub_m,
                        "BLOCK_K": bk,
                        "BLOCK_N": bn,
                        "SPLIT_N": split,
                    }
                    sig = {**_signature(kernel, pointers), **{k: "constexpr" for k in constexprs}}
                    name = (
                        f"multi_lora shrink_expand {kind} {dtype} base{int(has_base)} h{int(store_h)} "
                        f"y{int(store_y)} R{r_pad} M{sub_m}-K{bk}-N{bn}-S{split}-w{warps}-s{stages}"
                    )
                    yield name + " aligned", kernel, *aligned(sig, constexprs, unit), warps, stages
                    if i == 0 and r_pad == 16:
                        yield name + " strided", kernel, sig, constexprs, {}, warps, stages


def weight_grad_variants():
    partial = ml._weight_grad_partial_kernel
    for dtype, ptr in DTYPES.items():
        configs = ml.PARTIAL_CONFIGS if dtype == "bf16" else ml.PARTIAL_CONFIGS[:1]
        pointers = {"h_ptr": "*fp32", "x_ptr": ptr, "rows_ptr": "*i64", "rblocks_ptr": "*i32", "part_ptr": "*fp32"}
        for r_pad in (16, 64):
            for i, (bk, warps, stages) in enumerate(configs):
                if r_pad != 16 and i:
                    continue
                constexprs = {
                    "R_PAD": r_pad,
                    "BLOCK_M": BLOCK_M,
                    "BLOCK_K": bk,
                    "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
                }
                sig = {**_signature(partial, pointers), **{k: "constexpr" for k in constexprs}}
                name = f"multi_lora weight_grad_partial {dtype} R{r_pad} K{bk}-w{warps}-s{stages}"
                yield name + " aligned", partial, *aligned(sig, constexprs, ["stride_xk"]), warps, stages
        summed = ml._sum_partials_kernel
        pointers = {"part_ptr": "*fp32", "offsets_ptr": "*i32", "out_ptr": ptr}
        constexprs = {"BLOCK": 1024}
        sig = {**_signature(summed, pointers), "BLOCK": "constexpr"}
        yield f"multi_lora sum_partials {dtype} strided", summed, sig, constexprs, {}, 4, 1


# Name fragments of the quick set: each kernel, flag combination and tile shape class once.
QUICK = (
    "fwd bf16 base1 h1 y1 R16 M64-K64-N128-S1-w4-s3 aligned",
    "fwd bf16 base1 h1 y1 R16 M32-K128-N128-S2-w4-s3 aligned",
    "fwd fp32 base1 h1 y1 R16 M64-K64-N128-S1-w4-s3 strided",
    "bwd bf16 base0 h1 y1 R64 M64-K64-N128-S1-w4-s3 aligned",
    "bwd fp16 base0 h1 y0 R16 M64-K64-N128-S1-w4-s3 aligned",
    "weight_grad_partial bf16 R16 K128-w4-s3 aligned",
    "sum_partials bf16 strided",
)


def _variants(kind):
    if kind == "quick":
        every = [*shrink_expand_variants("fwd"), *shrink_expand_variants("bwd"), *weight_grad_variants()]
        chosen = [v for v in every if any(v[0].endswith(q) for q in QUICK)]
        assert len(chosen) == len(QUICK), [v[0] for v in chosen]
        return chosen
    return weight_grad_variants() if kind == "grad" else shrink_expand_variants(kind)


def main(kinds):
    for kind in kinds:
        for name, kernel, signature, constexprs, attrs, warps, stages in _variants(kind):
            fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=H100, options={"num_warps": warps, "num_stages": stages})
            ptx = compiled.asm["ptx"]
            assert compiled.asm.get("cubin"), f"{name}: no cubin"
            assert "st.global" in ptx, f"{name}: the kernel stores nothing"
            if "shrink_expand" in name and name.endswith("aligned") and "bf16" in name:
                # The tile dots must run on the tensor cores (Hopper wgmma or mma).
                assert "wgmma" in ptx or "mma.sync" in ptx, f"{name}: no tensor-core instruction"
            print("compiled", name, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["fwd", "bwd", "grad"])
