"""Compile the infonce_lse Triton kernels for the H100 (sm_90) down to a cubin, without a GPU.

Run as a script (`python tests/ops/compile_infonce_sm90.py [all]`) where TRITON_INTERPRET is
unset. Every variant is specialised as an aligned launch (contiguous, 16-divisible sizes, D a
multiple of BLOCK_D) and must compile without register spills (``sm90_common.compile_checked``).
Without ``all`` (CPU CI, ~16 compiles): every shipped configuration of the benchmark's option
set (the positive only) forward and backward in bf16, the fewest-masks and all-masks option sets
with each configuration the autotuner may pick for them, and fp32. ``all`` adds more option
sets and fp16. Prints one line per compiled variant with its registers, spills, shared memory
and occupancy; exits non-zero on the first failure.
"""

import sys

from sm90_common import aligned, compile_checked  # a sibling when run as a script

from latentembed.bench.sm90 import jit_function
from latentembed.ops.infonce import triton as tri

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
    "dst_ptr": "data",
    "m_part_ptr": "fp32",
    "l_part_ptr": "fp32",
    "c_part_ptr": "i32",
    "dscale_part_ptr": "fp32",
}
FWD_ONLY = {"spos_ptr", "m_part_ptr", "l_part_ptr", "c_part_ptr"}
BWD_ONLY = {"lse_ptr", "g_ptr", "dst_ptr", "dscale_part_ptr"}
FLAG_PTRS = {
    "HAS_POS": ["pos_index_ptr", "spos_ptr"],
    "HAS_OWNER": ["doc_owner_ptr"],
    "HAS_KEY": ["doc_key_ptr", "pos_key_ptr"],
    "HAS_MARGIN": ["bound_ptr"],
}
FLAGS = ("HAS_POS", "HAS_OWNER", "HAS_KEY", "HAS_THRESHOLD", "HAS_MARGIN", "EXCLUDE_DIAG")
# Option sets by name (the flags that are on): the benchmark's, none, every mask, and the
# combinations the loss module uses.
OPTION_SETS = {
    "pos": ("HAS_POS",),
    "none": (),
    "all": FLAGS,
    "pos-key": ("HAS_POS", "HAS_KEY"),
    "pos-owner": ("HAS_POS", "HAS_OWNER"),
    "pos-key-diag": ("HAS_POS", "HAS_KEY", "EXCLUDE_DIAG"),
    "pos-threshold": ("HAS_POS", "HAS_THRESHOLD"),
    "pos-margin-key": ("HAS_POS", "HAS_MARGIN", "HAS_KEY"),
    "key-poskey-diag": ("HAS_KEY", "EXCLUDE_DIAG"),
}
QUICK = [("pos", "bf16"), ("none", "bf16"), ("all", "bf16"), ("pos", "fp32"), ("all", "fp32")]


def tile_variant(option_set: str, dtype: str, backward: bool, config: tuple):
    """(name, signature, constexprs, attrs, num_warps, num_stages) of one tile-kernel variant."""
    flags = {f: f in OPTION_SETS[option_set] for f in FLAGS}
    names = [p.name for p in jit_function(tri._infonce_tile_kernel).params if not p.is_constexpr]
    signature, constexprs = {}, {}
    for n in names:
        kind = PTR.get(n)
        absent = (
            (n in FWD_ONLY and backward)
            or (n in BWD_ONLY and not backward)
            or any(n in ptrs and not flags[f] for f, ptrs in FLAG_PTRS.items())
        )
        if kind is not None and absent:
            signature[n], constexprs[n] = "constexpr", None
        elif kind is not None:
            signature[n] = "*" + (dtype if kind == "data" else kind)
        else:
            signature[n] = "fp32" if n == "threshold" else "i32"
    bm, bn, bd, warps, stages = config
    constexprs.update(
        flags,
        SUB_POS=backward and flags["HAS_POS"],
        BACKWARD=backward,
        PRECISION="ieee" if dtype == "fp32" else "tf32",
        EVEN_D=True,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
    )
    signature.update({k: "constexpr" for k in constexprs})
    name = f"tile {'bwd' if backward else 'fwd'} {dtype} {option_set} M{bm}-N{bn}-D{bd}-w{warps}-s{stages}"
    return (name, *aligned(signature, constexprs, []), warps, stages)


def variants(everything: bool):
    """Every shipped configuration (what the autotuner may try) of the chosen option sets."""
    pairs = [(o, t) for o in OPTION_SETS for t in ("bf16", "fp16", "fp32")] if everything else QUICK
    for option_set, dtype in pairs:
        masks = any(f != "HAS_POS" for f in OPTION_SETS[option_set])
        for backward in (False, True):
            for config in tri.shipped_configs(dtype == "fp32", backward, masks):
                yield tile_variant(option_set, dtype, backward, config)


def positive_score_variants():
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
        yield (f"positive score {dtype}", *aligned(sig, {"BLOCK_D": 1024}, []), 4, 1)


def main(argv):
    everything = "all" in argv
    for name, signature, constexprs, attrs, warps, stages in variants(everything):
        # The score tiles of 16-bit inputs must run on tensor cores (Hopper wgmma or mma).
        compile_checked(
            name, tri._infonce_tile_kernel, signature, constexprs, attrs, warps, stages, tensor_cores="fp32" not in name
        )
    for name, signature, constexprs, attrs, warps, stages in positive_score_variants():
        compile_checked(name, tri._positive_score_kernel, signature, constexprs, attrs, warps, stages)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
