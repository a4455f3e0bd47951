"""Compile the latent-attention Triton kernels for the H100 (sm_90) down to a cubin, without a GPU.

Run as a script (`python tests/ops/compile_latent_attention_sm90.py [--all]`) in a process where
TRITON_INTERPRET is unset. Every variant is specialised as an aligned launch and must compile
without register spills (``sm90_common.compile_checked``). By default (CPU CI): every shipped
configuration of every kernel in bf16 at NV-Embed-v2's size (R = 512 latents), the score kernel
also at R = 16 and in fp32, and dM's fp32 configurations. ``--all`` adds every R from 16 to 512
and fp16 / fp32 for every kernel. Prints one line per compiled variant with its resources;
exits non-zero on the first failure.
"""

import sys

from sm90_common import aligned, compile_checked  # a sibling when run as a script

from latentembed.bench.sm90 import jit_function
from latentembed.ops.latent_attention import triton as lat

# Pointers in the data dtype; the rest are fp32 (LayerNorm statistics, parameters, partial sums,
# the fp32 dP of the softmax backward) or int32 (cu_seqlens).
FP32_PTRS = {"w_ptr", "b_ptr", "mean_ptr", "rstd_ptr", "dw_ptr", "db_ptr", "dp_ptr"}
FLOAT_ARGS = {"eps"}


def _signature(kernel, dtype):
    sig = {}
    for p in jit_function(kernel).params:
        if p.is_constexpr:
            continue
        if p.name.endswith("_ptr"):
            sig[p.name] = "*fp32" if p.name in FP32_PTRS else ("*i32" if p.name == "cu_ptr" else "*" + dtype)
        else:
            sig[p.name] = "fp32" if p.name in FLOAT_ARGS else "i32"
    return sig


def _shipped(kernel, dtype, block_r):
    """The configurations the autotuner may try for this dtype (and R), after the kernel's pruning."""
    configs = kernel.configs
    prune = kernel.early_config_prune
    if prune is None:
        return configs
    import torch

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    probe = torch.empty(0, dtype=torch_dtype)
    return prune(configs, {}, BLOCK_R=block_r, ds_ptr=probe, x_ptr=probe)


def variants(everything=False):
    """(name, kernel, signature, constexprs, attrs, num_warps, num_stages, uses_tensor_cores)."""
    kernels = [
        ("ln_stats", lat._ln_stats_kernel, False, None),
        ("scores_softmax", lat._scores_softmax_kernel, True, 512),
        ("softmax_bwd", lat._softmax_bwd_kernel, False, 512),
        ("dm", lat._dm_kernel, True, None),
        ("geglu_fwd", lat._geglu_mean_fwd_kernel, False, None),
        ("geglu_bwd", lat._geglu_mean_bwd_kernel, False, None),
    ]
    for dtype in ("bf16", "fp16", "fp32"):
        for name, kernel, dot, block_r in kernels:
            if dtype == "fp16" and not everything:
                continue
            if dtype == "fp32" and not everything and name not in ("scores_softmax", "dm"):
                continue
            rs = [block_r] if block_r is None else ([16, 64, 128, 256, 512] if everything else [512, 16])
            if dtype == "fp32" and name == "scores_softmax" and not everything:
                rs = [512]
            for r in rs:
                for cfg in _shipped(kernel, dtype, r):
                    constexprs = dict(cfg.kwargs)
                    if dot:
                        constexprs["IEEE"] = dtype == "fp32"
                    if r is not None:
                        constexprs["BLOCK_R"] = r
                    sig = {**_signature(kernel, dtype), **{k: "constexpr" for k in constexprs}}
                    label = f"{name} {dtype} " + "-".join(f"{k}{v}" for k, v in constexprs.items())
                    yield (
                        label,
                        kernel,
                        *aligned(sig, constexprs, []),
                        cfg.num_warps,
                        cfg.num_stages,
                        dot and dtype != "fp32",
                    )
    # The LayerNorm backward is not autotuned: its one GPU configuration.
    for dtype in ("bf16", "fp32") if everything else ("bf16",):
        constexprs = {"BLOCK_T": 16, "BLOCK_D": 256}
        sig = {**_signature(lat._ln_bwd_kernel, dtype), **{k: "constexpr" for k in constexprs}}
        yield f"ln_bwd {dtype}", lat._ln_bwd_kernel, *aligned(sig, constexprs, []), 4, 3, False


def main(everything):
    for name, kernel, signature, constexprs, attrs, warps, stages, dot in variants(everything):
        # Bandwidth-bound GEGLU kernels must use 16-byte accesses on aligned bf16 input.
        wide = "ld.global.v4" if name.startswith("geglu") and " bf16 " in name else ""
        compile_checked(
            f"{name} w{warps}-s{stages}",
            kernel,
            signature,
            constexprs,
            attrs,
            warps,
            stages,
            tensor_cores=dot,
            wide_access=wide,
        )


if __name__ == "__main__":
    main("--all" in sys.argv[1:])
