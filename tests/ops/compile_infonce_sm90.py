"""Compile the infonce_lse Triton kernels for the H100 (sm_90) down to a cubin, without a GPU.

Run as a script (`python tests/ops/compile_infonce_sm90.py [all]`) where TRITON_INTERPRET is
unset. Without `all` it compiles one variant per kernel and mode (what CPU CI runs, ~5
compiles); `all` adds every autotune config and option set. Prints one line per compiled
variant; exits non-zero on the first failure.
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET to compile kernels"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from latentembed.ops.infonce import triton as tri  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
PTR = {
    "q_ptr": "data",
    "d_ptr": "data",
    "scale_ptr": "fp32",
    "pos_index_ptr": "i64",
    "bound_ptr": "fp32",
    "doc_owner_ptr": "i64",
    "doc_key_ptr": "i64",
    "pos_key_ptr": "i64",
    "spos_ptr": "fp32",
    "lse_ptr": "fp32",
    "g_ptr": "fp32",
    "ds_ptr": "data",
    "m_part_ptr": "fp32",
    "l_part_ptr": "fp32",
    "c_part_ptr": "i32",
    "dscale_part_ptr": "fp32",
}
FWD_ONLY = {"spos_ptr", "m_part_ptr", "l_part_ptr", "c_part_ptr"}
BWD_ONLY = {"lse_ptr", "g_ptr", "ds_ptr", "dscale_part_ptr"}
FLAG_PTRS = {
    "HAS_POS": ["pos_index_ptr", "spos_ptr"],
    "HAS_OWNER": ["doc_owner_ptr"],
    "HAS_KEY": ["doc_key_ptr", "pos_key_ptr"],
    "HAS_MARGIN": ["bound_ptr"],
}


def tile_variants():
    """(name, kernel, signature, constexprs, num_warps, num_stages) of the score-tile kernel."""
    names = [p.name for p in tri._infonce_tile_kernel.fn.params if not p.is_constexpr]
    every = dict(HAS_POS=True, HAS_OWNER=True, HAS_KEY=True, HAS_THRESHOLD=True, HAS_MARGIN=True, EXCLUDE_DIAG=True)
    none = {k: False for k in every}
    cases = [
        ("bf16", every, False, tri.GPU_CONFIGS),
        ("bf16", every, True, tri.GPU_CONFIGS[:1]),
        ("bf16", none, False, tri.GPU_CONFIGS[:1]),
        ("bf16", none, True, tri.GPU_CONFIGS[:1]),
        ("fp16", every, True, tri.GPU_CONFIGS[:1]),
        ("fp32", every, False, tri.GPU_CONFIGS[:1]),
    ]
    for dtype, flags, backward, configs in cases:
        signature, constexprs = {}, {}
        for n in names:
            kind = PTR.get(n)
            absent = (
                (n in FWD_ONLY and backward)
                or (n in BWD_ONLY and not backward)
                or any(n in ptrs and not flags[f] for f, ptrs in FLAG_PTRS.items())
            )
            if n == "spos_ptr" and backward:
                absent = True
            if kind is not None and absent:
                signature[n], constexprs[n] = "constexpr", None
            elif kind is not None:
                signature[n] = "*" + (dtype if kind == "data" else kind)
            else:
                signature[n] = "fp32" if n == "threshold" else "i32"
        for bm, bn, bd, warps, stages in configs:
            cx = {
                **constexprs,
                **flags,
                "SUB_POS": backward and flags["HAS_POS"],
                "BACKWARD": backward,
                "PRECISION": tri._precision(_torch_dtype(dtype)),
                "BLOCK_M": bm,
                "BLOCK_N": bn,
                "BLOCK_D": bd,
            }
            sig = {**signature, **{k: "constexpr" for k in cx}}
            flag_name = "all-options" if flags["HAS_POS"] else "no-options"
            yield (
                f"tile {'bwd' if backward else 'fwd'} {dtype} {flag_name} M{bm}-N{bn}-D{bd}-w{warps}-s{stages}",
                tri._infonce_tile_kernel,
                sig,
                cx,
                warps,
                stages,
            )
    for dtype in ("bf16", "fp32"):
        sig = {
            "q_ptr": f"*{dtype}",
            "d_ptr": f"*{dtype}",
            "pos_index_ptr": "*i64",
            "out_ptr": "*fp32",
            "D": "i32",
            "stride_q": "i32",
            "stride_d": "i32",
            "BLOCK_D": "constexpr",
        }
        yield f"positive score {dtype}", tri._positive_score_kernel, sig, {"BLOCK_D": 1024}, 4, 1
        sig = {
            "a_ptr": f"*{dtype}",
            "b_ptr": f"*{dtype}",
            "c_ptr": "*fp32",
            "M": "i32",
            "K": "i32",
            "Ncol": "i32",
            "stride_a": "i32",
            "stride_b": "i32",
            "stride_c": "i32",
            "PRECISION": "constexpr",
            "BLOCK_M": "constexpr",
            "BLOCK_N": "constexpr",
            "BLOCK_K": "constexpr",
        }
        cx = {"PRECISION": tri._precision(_torch_dtype(dtype)), "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}
        yield f"accumulate matmul {dtype}", tri._matmul_accumulate_kernel, sig, cx, 8, 3


def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


QUICK = (
    "tile fwd bf16 all-options M128-N128-D64-w8-s3",
    "tile bwd bf16 all-options M128-N128-D64-w8-s3",
    "tile fwd fp32 all-options M128-N128-D64-w8-s3",
    "positive score bf16",
    "accumulate matmul bf16",
)


def main(argv):
    for name, kernel, signature, constexprs, warps, stages in tile_variants():
        if "all" not in argv and name not in QUICK:
            continue
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=H100, options={"num_warps": warps, "num_stages": stages})
        assert compiled.asm.get("cubin"), f"{name}: no cubin"
        ptx = compiled.asm["ptx"]
        assert "st.global" in ptx, f"{name}: the kernel stores nothing"
        if "tile" in name and "bf16" in name:
            # The score tiles must run on tensor cores (Hopper wgmma or mma).
            assert "wgmma" in ptx or "mma.sync" in ptx, f"{name}: no tensor-core instruction"
        print("compiled", name, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
