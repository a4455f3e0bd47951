"""Compile the multi-LoRA Triton kernels for the H100 (sm_90) down to a cubin, without a GPU.

Run as a script (`python tests/ops/compile_multi_lora_sm90.py [fwd|bwd|grad|quick ...]`) with
TRITON_INTERPRET unset. Every aligned variant must compile without register spills
(``sm90_common.compile_checked``). Prints one line per compiled variant with its resources;
exits non-zero on the first failure. The full set (every shipped configuration of each dtype,
flag combination and rank class, ~150 builds) takes many minutes on a 2-core machine; ``quick``
(what CPU CI runs) builds one variant of each distinct code path, the largest rank class in
bf16 and fp32 included.
"""

import sys

from sm90_common import aligned, compile_checked  # a sibling when run as a script

from latentembed.bench.sm90 import jit_function
from latentembed.ops.multi_lora import triton as ml
from latentembed.ops.multi_lora.grouping import BLOCK_M

DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _signature(kernel, pointers: dict) -> dict:
    sig = {p.name: "i32" for p in jit_function(kernel).params if not p.is_constexpr}
    sig.update(pointers)
    return sig


RANKS = (16, 32, 64, 128)  # every R_PAD class (rank_pad: powers of two from 16; the op takes R <= 128)


def shrink_expand_variants(kind: str, everything: bool = True):
    """fwd: base added, h stored. bwd: no base, h stored (dA needed) or not, dx stored or not.
    Every shipped configuration of each dtype at every rank class (``everything``), plus one
    strided (generic) build per dtype and mode."""
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
        configs = ml.shipped_configs("shrink_expand", dtype == "fp32")
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
            for r_pad in RANKS:
                for i, (sub_m, bk, bn, split, warps, stages) in enumerate(configs):
                    if not everything and (i or r_pad != 16):
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


def weight_grad_variants(everything: bool = True):
    partial = ml._weight_grad_partial_kernel
    for dtype, ptr in DTYPES.items():
        configs = ml.shipped_configs("partial", dtype == "fp32")
        pointers = {"h_ptr": "*fp32", "x_ptr": ptr, "rows_ptr": "*i64", "rblocks_ptr": "*i32", "part_ptr": "*fp32"}
        for r_pad in RANKS:
            for i, (bk, warps, stages) in enumerate(configs):
                if not everything and (i or r_pad != 16):
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


def _quick_names():
    """Each kernel, flag combination and tile shape class once, and the largest rank class (128)
    with the first shipped configuration of bf16 and of fp32 (where spills appeared)."""
    half, fp32 = ml.shipped_configs("shrink_expand", False), ml.shipped_configs("shrink_expand", True)
    tile = "M{}-K{}-N{}-S{}-w{}-s{}".format
    p_half, p_fp32 = ml.shipped_configs("partial", False), ml.shipped_configs("partial", True)
    part = "K{}-w{}-s{}".format
    return (
        f"fwd bf16 base1 h1 y1 R16 {tile(*half[0])} aligned",
        f"fwd bf16 base1 h1 y1 R16 {tile(*half[1])} aligned",
        f"fwd bf16 base1 h1 y1 R128 {tile(*half[0])} aligned",
        f"fwd fp32 base1 h1 y1 R16 {tile(*fp32[0])} strided",
        f"fwd fp32 base1 h1 y1 R128 {tile(*fp32[0])} aligned",
        f"bwd bf16 base0 h1 y1 R64 {tile(*half[0])} aligned",
        f"bwd fp16 base0 h1 y0 R16 {tile(*half[0])} aligned",
        f"bwd fp32 base0 h1 y1 R128 {tile(*fp32[0])} aligned",
        f"weight_grad_partial bf16 R16 {part(*p_half[1])} aligned",
        f"weight_grad_partial fp32 R128 {part(*p_fp32[0])} aligned",
        "sum_partials bf16 strided",
    )


def _variants(kind):
    if kind == "quick":
        every = [*shrink_expand_variants("fwd"), *shrink_expand_variants("bwd"), *weight_grad_variants()]
        quick = _quick_names()
        chosen = [v for v in every if any(v[0].endswith(q) for q in quick)]
        assert len(chosen) == len(quick), [v[0] for v in chosen]
        return chosen
    return weight_grad_variants() if kind == "grad" else shrink_expand_variants(kind)


def main(kinds):
    for kind in kinds:
        for name, kernel, signature, constexprs, attrs, warps, stages in _variants(kind):
            aligned_launch = name.endswith("aligned")
            compile_checked(
                name,
                kernel,
                signature,
                constexprs,
                attrs,
                warps,
                stages,
                # The tile dots of 16-bit inputs must run on the tensor cores (wgmma or mma).
                tensor_cores="shrink_expand" in name and aligned_launch and " fp32 " not in name,
                # Spills are checked on aligned launches, the shipped fast path (a strided build
                # is a compile check of the generic path only).
                spill_free=aligned_launch,
            )


if __name__ == "__main__":
    main(sys.argv[1:] or ["fwd", "bwd", "grad"])
