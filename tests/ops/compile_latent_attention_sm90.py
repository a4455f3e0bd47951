"""Compile the latent-attention Triton kernels for the H100 (sm_90) down to a cubin, without a GPU.

Run as a script (`python tests/ops/compile_latent_attention_sm90.py [--all]`) in a process where
TRITON_INTERPRET is unset. By default (CI, about 10 s of CPU): every kernel in bf16 with its
first autotune config at NV-Embed-v2's size (R = 512 latents), and the score kernel in fp32 (its
IEEE dot path). ``--all`` adds every bf16 config that survives the kernels' own pruning, a small
R, and fp16 and fp32 for every dot kernel. Prints one
line per compiled variant; exits non-zero on the first failure.
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET to compile kernels"

import triton  # noqa: E402
from compile_masked_mean_sm90 import H100, aligned  # noqa: E402  (a sibling when run as a script)
from triton.compiler import ASTSource  # noqa: E402

from latentembed.ops.latent_attention import triton as lat  # noqa: E402

# Pointers in the data dtype; the rest are fp32 (LayerNorm statistics, parameters, partial sums)
# or int32 (cu_seqlens).
FP32_PTRS = {"w_ptr", "b_ptr", "mean_ptr", "rstd_ptr", "dw_ptr", "db_ptr"}
FLOAT_ARGS = {"eps"}


def _jit(kernel):
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def _signature(kernel, dtype):
    sig = {}
    for p in _jit(kernel).params:
        if p.is_constexpr:
            continue
        if p.name.endswith("_ptr"):
            sig[p.name] = "*fp32" if p.name in FP32_PTRS else ("*i32" if p.name == "cu_ptr" else "*" + dtype)
        else:
            sig[p.name] = "fp32" if p.name in FLOAT_ARGS else "i32"
    return sig


def _configs(kernel, block_r):
    configs = kernel.configs
    if block_r is not None:
        configs = lat._prune_score_tiles(configs, {}, BLOCK_R=block_r)
    return configs


def _pick(name, configs, dtype, dot, everything):
    if everything:
        return configs if dtype == "bf16" else configs[:1] if dot else []
    if dtype == "bf16" or (dtype == "fp32" and name == "scores_softmax"):
        return configs[:1]
    return []


# The most dynamic shared memory one block may use on sm_90 (227 KiB).
H100_MAX_SHARED_BYTES = 232448


def variants(everything=False):
    """(name, kernel, signature, constexprs, attrs, num_warps, num_stages, uses_tensor_cores)."""
    kernels = [
        ("ln_stats", lat._ln_stats_kernel, False, None),
        ("scores_softmax", lat._scores_softmax_kernel, True, 512),
        ("dscores", lat._dscores_kernel, True, 512),
        ("dm", lat._dm_kernel, True, None),
        ("geglu_fwd", lat._geglu_mean_fwd_kernel, False, None),
        ("geglu_bwd", lat._geglu_mean_bwd_kernel, False, None),
    ]
    for dtype in ("bf16", "fp16", "fp32"):
        for name, kernel, dot, block_r in kernels:
            configs = _configs(kernel, block_r)
            small_r = [16] if block_r is not None and dtype == "bf16" and everything else []
            for r in ([block_r] if block_r else [None]) + small_r:
                picked = _pick(name, configs, dtype, dot, everything)
                for cfg in picked if r == block_r else _configs(kernel, r)[:1]:
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
        src = ASTSource(fn=_jit(kernel), signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=H100, options={"num_warps": warps, "num_stages": stages})
        ptx = compiled.asm["ptx"]
        assert compiled.asm.get("cubin"), f"{name}: no cubin"
        # Triton only checks shared memory at launch: catch a config that cannot run here.
        shared = compiled.metadata.shared
        assert shared <= H100_MAX_SHARED_BYTES, f"{name}: needs {shared} B of shared memory > {H100_MAX_SHARED_BYTES}"
        assert "st.global" in ptx, f"{name}: the kernel stores nothing"
        if dot:  # half-precision dots must run on tensor cores
            assert "mma" in ptx, f"{name}: no tensor-core (mma/wgmma) instruction in the PTX"
        if name.startswith("geglu") and " bf16 " in name:  # bandwidth-bound: 16-byte accesses
            assert "ld.global.v4" in ptx, f"{name}: no 16-byte loads in the PTX"
        print("compiled", name, f"w{warps}-s{stages}", flush=True)


if __name__ == "__main__":
    main("--all" in sys.argv[1:])
