"""The Triton kernels on each target's path, specialised as the target workload launches them
(bf16, contiguous, 16-divisible sizes), compiled for sm_90 to read their resources on CPU.

``python -m latentembed.bench.kernels [--json PATH]`` compiles every shipped configuration of
these kernels (about 40 builds, a minute or two on one core) in a process where
TRITON_INTERPRET must be unset, and prints (or writes) their registers, spills, shared memory
and occupancy; :func:`target_kernel_resources` runs it in a subprocess. The broad sweeps over
dtypes and options (and the zero-spill assertions) are the sm_90 compile checks in tests/ops/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Optional

FLOAT_ARGS = {"eps", "threshold"}


def _variant(label: str, kernel, config, dtype: str = "bf16", pointers: Optional[dict] = None, unit=(), **constexprs):
    """(label, kernel, signature, constexprs, attrs, num_warps, num_stages) of one aligned launch.

    ``config``: a triton.Config or ``(meta dict, num_warps, num_stages)``; ``pointers``: dtype of
    each pointer that is not ``dtype`` (None: absent, a constexpr None); ``unit``: the integer
    arguments a contiguous launch passes as 1 (Triton makes them constants); the other integers
    and the pointers are 16-divisible, as at the target shapes."""
    from .sm90 import jit_function

    meta, warps, stages = (config.kwargs, config.num_warps, config.num_stages) if hasattr(config, "kwargs") else config
    pointers = pointers or {}
    signature, cx = {}, dict(meta, **constexprs)
    for p in jit_function(kernel).params:
        if p.is_constexpr:
            continue
        if p.name in unit:
            signature[p.name], cx[p.name] = "constexpr", 1
        elif p.name.endswith("_ptr"):
            kind = pointers.get(p.name, dtype)
            if kind is None:
                signature[p.name], cx[p.name] = "constexpr", None
            else:
                signature[p.name] = "*" + kind
        else:
            signature[p.name] = "fp32" if p.name in FLOAT_ARGS else "i32"
    signature.update({k: "constexpr" for k in cx if k not in signature})
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t != "constexpr"}
    name = f"{label} " + "-".join(f"{k}{v}" for k, v in meta.items()) + f" w{warps}-s{stages}"
    return name, kernel, signature, cx, attrs, warps, stages


def target_variants() -> list:
    """Every shipped configuration of the kernels on the targets' paths (bench.model's labels)."""
    from ..ops.infonce import triton as nce
    from ..ops.latent_attention import triton as lat
    from ..ops.masked_mean import triton as mm
    from ..ops.multi_lora import triton as ml
    from ..ops.multi_lora.grouping import BLOCK_M

    out = []
    # masked mean, padded with a mask (the target's layout)
    masked_mean = ((mm.KERNELS["fwd"], "masked_mean_fwd"), (mm.KERNELS["bwd"], "masked_mean_bwd"))
    for kernel, label in masked_mean:
        for cfg in kernel.configs:
            ptrs = {"mask_ptr": "u8", "cu_ptr": None}
            unit = ("stride_hd", "stride_ml") if label.endswith("fwd") else ("stride_ml",)
            out.append(_variant(label, kernel, cfg, pointers=ptrs, unit=unit, HAS_MASK=True, IS_VARLEN=False))
    # latent attention at R = 512
    fp32 = {n: "fp32" for n in ("w_ptr", "b_ptr", "mean_ptr", "rstd_ptr", "dw_ptr", "db_ptr", "dp_ptr")}
    for cfg in lat.KERNELS["ln_stats"].configs:
        out.append(_variant("ln_stats", lat.KERNELS["ln_stats"], cfg, pointers=fp32))
    for cfg in lat.SCORE_HALF_CONFIGS:
        meta = ({"BLOCK_T": cfg[0], "BLOCK_D": cfg[1]}, cfg[2], cfg[3])
        scores = lat.KERNELS["scores_softmax"]
        out.append(_variant("scores_softmax", scores, meta, pointers=fp32, IEEE=False, BLOCK_R=512))
    for cfg in lat.KERNELS["softmax_bwd"].configs:
        out.append(_variant("softmax_bwd", lat.KERNELS["softmax_bwd"], cfg, pointers=fp32, BLOCK_R=512))
    for n, d, t, w, s in lat.DM_HALF_CONFIGS:
        meta = ({"BLOCK_N": n, "BLOCK_D": d, "BLOCK_T": t}, w, s)
        out.append(_variant("dm", lat.KERNELS["dm"], meta, pointers=fp32, IEEE=False))
    out.append(_variant("ln_bwd", lat.KERNELS["ln_bwd"], ({"BLOCK_T": 16, "BLOCK_D": 256}, 4, 3), pointers=fp32))
    for kernel, label in ((lat.KERNELS["geglu_fwd"], "geglu_fwd"), (lat.KERNELS["geglu_bwd"], "geglu_bwd")):
        for cfg in kernel.configs:
            out.append(_variant(label, kernel, cfg, pointers={"cu_ptr": "i32"}))
    # InfoNCE tiles: the benchmark's rule (positives only), forward and backward (p - onehot)
    rule_off = {"bound_ptr": None, "doc_owner_ptr": None, "doc_key_ptr": None, "pos_key_ptr": None}
    i64, f32 = "i64", "fp32"
    base = dict(rule_off, scale_ptr=f32, pos_index_ptr=i64)
    flags = dict(HAS_POS=True, HAS_OWNER=False, HAS_KEY=False, HAS_THRESHOLD=False, HAS_MARGIN=False)
    flags.update(EXCLUDE_DIAG=False, PRECISION="tf32", EVEN_D=True)
    for backward in (False, True):
        ptrs = dict(base)
        if backward:
            ptrs.update(spos_ptr=None, m_part_ptr=None, l_part_ptr=None, c_part_ptr=None)
            ptrs.update(lse_ptr=f32, g_ptr=f32, dscale_part_ptr=f32)
        else:
            ptrs.update(spos_ptr=f32, m_part_ptr=f32, l_part_ptr=f32, c_part_ptr="i32")
            ptrs.update(lse_ptr=None, g_ptr=None, dst_ptr=None, dscale_part_ptr=None)
        label = "tile bwd" if backward else "tile fwd"
        for bm, bn, bd, w, s in nce.shipped_configs(False, backward, False):
            meta = ({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, w, s)
            tile = nce.KERNELS["tile"]
            out.append(_variant(label, tile, meta, pointers=ptrs, SUB_POS=backward, BACKWARD=backward, **flags))
    # multi-LoRA forward at rank 16: base added, h stored
    ptrs = {"scale_ptr": "fp32", "h_ptr": "fp32", "rows_ptr": "i64", "blocks_ptr": "i32"}
    for sub_m, bk, bn, split, w, s in ml.shipped_configs("shrink_expand", False):
        meta = ({"SUB_M": sub_m, "BLOCK_K": bk, "BLOCK_N": bn, "SPLIT_N": split}, w, s)
        flags = dict(HAS_BASE=True, STORE_H=True, STORE_Y=True, R_PAD=16, BLOCK_M=BLOCK_M, DOT_PRECISION="tf32")
        unit = ("stride_xk", "stride_bm", "stride_ym", "stride_w1k", "stride_w2r")
        out.append(_variant("shrink_expand fwd", ml.KERNELS["shrink_expand"], meta, pointers=ptrs, unit=unit, **flags))
    return out


def compile_all(variants: list) -> list:
    """Compile every variant for sm_90; a list of KernelResources dicts (one that fails to compile
    is reported with its error instead)."""
    from .sm90 import compile_sm90

    results = []
    for name, kernel, signature, cx, attrs, warps, stages in variants:
        try:
            _, res = compile_sm90(name, kernel, signature, cx, attrs, warps, stages)
            results.append(res.as_dict())
        except Exception as e:  # noqa: BLE001 - report and go on: a model, not a test
            results.append({"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
    return results


def target_kernel_resources(timeout: float = 900) -> list:
    """:func:`compile_all` of :func:`target_variants` in a subprocess without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "latentembed.bench.kernels", "--json", "-"],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compiling the target kernels failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the resources as JSON to this file ('-': stdout)")
    args = parser.parse_args(argv)
    results = compile_all(target_variants())
    if args.json == "-":
        print(json.dumps(results))
        return 0
    from .model import format_models

    print(format_models(resources=[r for r in results if "error" not in r]))
    for r in results:
        if "error" in r:
            print(f"failed: {r['name']}: {r['error']}")
    if args.json:
        from ..atomic_io import atomic_write_json

        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
