"""Performance model of every GPU target: FLOPs and bytes, the floor at the H100's measured
ceilings, and the design's own floor step by step, computed on any machine (no GPU needed).

For each target (docs/gpu.md, "Targets") the workload's work is split into the steps the design
runs one after the other (a Triton kernel, a cuBLAS GEMM, a memory-bound pass). Each step's floor
is max(FLOPs / matmul ceiling, bytes / copy bandwidth) at the ceilings measured on an H100
(:data:`MATMUL_CEILING_TFLOPS`, :data:`COPY_CEILING_GBPS`); the design floor is their sum (the steps
do not overlap), and "needs" is the fraction of the ceilings the design must sustain to meet the
target: above 100% the design cannot meet it, near 100% only at the ceilings. The compiled kernels'
registers, spills and occupancy come from :mod:`latentembed.bench.kernels` (sm_90 builds, on CPU)
or from the kernels a GPU run launched (:func:`latentembed.bench.sm90.launched_resources`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from ..ops.infonce.plan import backward_plan
from .harness import MATMUL_CEILING_TFLOPS

# Device-to-device copy on the H100, bytes read + written (docs/gpu.md, 2026-11-22).
COPY_CEILING_GBPS = 2960.0
MIB = 2**20


@dataclass
class Step:
    """One step of a design: ``flops`` on the tensor cores, ``bytes`` through device memory."""

    name: str
    flops: float = 0.0
    bytes: float = 0.0

    @property
    def floor_ms(self) -> float:
        return max(self.flops / (MATMUL_CEILING_TFLOPS * 1e12), self.bytes / (COPY_CEILING_GBPS * 1e9)) * 1e3

    @property
    def bound(self) -> str:
        compute = self.flops / (MATMUL_CEILING_TFLOPS * 1e12)
        return "compute" if compute >= self.bytes / (COPY_CEILING_GBPS * 1e9) else "memory"


@dataclass
class TargetModel:
    """One target: the workload's total work, the design's steps and the target itself."""

    op: str
    target: str  # as the benchmark's summary states it
    target_ms: Optional[float]
    flops: float  # the fewest FLOPs the workload needs
    bytes: float  # the fewest bytes it must move
    steps: list = field(default_factory=list)
    kernels: tuple = ()  # labels of the compiled kernels on the design's path (bench.kernels)
    note: str = ""

    @property
    def floor_ms(self) -> float:
        return Step("total", self.flops, self.bytes).floor_ms

    @property
    def design_floor_ms(self) -> float:
        return sum(s.floor_ms for s in self.steps) if self.steps else self.floor_ms

    @property
    def needs(self) -> Optional[float]:
        """Share of the ceilings the design must sustain to meet the target (None: no time target)."""
        return None if not self.target_ms else self.design_floor_ms / self.target_ms

    def as_dict(self) -> dict:
        out = asdict(self)
        out["steps"] = [dict(asdict(s), floor_ms=s.floor_ms, bound=s.bound) for s in self.steps]
        out.update(floor_ms=self.floor_ms, design_floor_ms=self.design_floor_ms, needs=self.needs)
        return out


def masked_mean_models() -> list:
    B, L, D, e = 64, 512, 4096, 2
    read, pooled = B * L * D * e, B * D * e
    fwd = [Step("masked mean forward: read [B, L, D] once, write [B, D]", 0, read + pooled)]
    bwd = [Step("masked mean backward: read [B, D], write the [B, L, D] gradient", 0, pooled + read)]
    kernels = ("masked_mean_fwd", "masked_mean_bwd")
    return [
        TargetModel("masked_mean_pool", "padded fwd <= 0.1 ms", 0.10, 0, read + pooled, fwd, kernels[:1]),
        TargetModel("masked_mean_pool", "padded fwd+bwd <= 0.22 ms", 0.22, 0, 2 * (read + pooled), fwd + bwd, kernels),
    ]


def latent_attention_models(tokens: int = 4608, batch: int = 16) -> list:
    """NV-Embed-v2 (D 4096, R 512 latents, H 8 heads, feed-forward 2 x 16384), ~4.6k pooled rows
    (16 sequences, lengths uniform in 64..512: 16 x 288 on average)."""
    D, R, H, F, e = 4096, 512, 8, 16384, 2
    T = tokens
    gemm_scores = 2 * T * D * H * R
    x, p, a = T * D * e, T * H * R * e, T * 2 * F * e
    w1, w2, mu = 2 * F * D * e, D * F * e, 2 * H * R * D * e
    steps = [
        Step("LayerNorm statistics (read x)", 0, x),
        Step("scores + softmax (Triton: LN on load, one GEMM of 2 T D H R; write P)", gemm_scores, x + mu / 2 + p),
        Step("y = x + P U (cuBLAS addmm)", gemm_scores, p + mu / 2 + 2 * x),
        Step("LN2 (read y, write z: mixed-dtype layer_norm)", 0, 2 * x),
        Step("a = z W1^T + b1 (cuBLAS, [T, 2F])", 2 * T * D * 2 * F, x + w1 + a),
        Step("GEGLU segment mean (read a)", 0, a),
        Step("residual mean in fp32 (read y)", 0, x),
        Step("W2 once per sequence (reads W2)", 2 * batch * F * D, w2),
    ]
    flops = sum(s.flops for s in steps)
    least = x + mu + w1 + w2  # inputs and weights read once; P and a need never reach memory
    fold = 2 * R * D * 2 * H * 4096 + 2 * (2 * H * R * 4096 * D)
    train = 3 * (flops + fold)
    fwd = TargetModel(
        "latent_attention_pooling",
        "fwd <= 2.6 ms",
        2.6,
        flops,
        least,
        steps,
        ("ln_stats", "scores_softmax", "geglu_fwd"),
        note="the GEGLU mean reads the [T, 2F] activation (302 MB) once more: fusing it into the W1 GEMM's "
        "epilogue would remove that step",
    )
    fwd_bwd = TargetModel(
        "latent_attention_pooling",
        "fwd+bwd <= 8 ms",
        8.0,
        train,
        3 * least,
        [Step("training every weight: 3 x (forward + fold)", train, 3 * least)],
        ("softmax_bwd", "dm", "ln_bwd", "geglu_bwd"),
        note="above the target at the ceilings: the fold and every weight-gradient GEMM count",
    )
    return [fwd, fwd_bwd]


def infonce_models(B: int = 4096, N: int = 16384, D: int = 4096) -> list:
    e = 2
    mm = 2 * B * N * D
    inputs = (B + N) * D * e
    plan = backward_plan(B, N, D, _bf16())
    groups = -(-N // 1024)
    steps = [
        Step("forward score tiles (Triton, masked online logsumexp)", mm, inputs),
        Step("backward score tiles (Triton, recomputed; writes dS^T [N, B])", mm, inputs + B * N * e),
        Step("dq = dS d (cuBLAS, one GEMM over all N: no fp32 accumulator)", mm, B * N * e + N * D * e + B * D * e),
        Step("dd = dS^T q (cuBLAS, blocks of 1024 documents)", mm, B * N * e + B * D * e + N * D * e),
    ]
    extra = plan.extra_bytes(B, D, e, groups) / MIB
    return [
        TargetModel(
            "infonce_lse",
            "fwd+bwd <= 3.4 ms",
            3.4,
            4 * mm,
            2 * inputs,
            steps,
            ("tile fwd", "tile bwd"),
            note=f"extra memory by the plan: {extra:.1f} MiB (target <= 200 MiB); the four matmuls are the "
            "floor for not storing scores",
        )
    ]


def multi_lora_models() -> list:
    layers, n, d, r, e = 4, 16 * 512, 4096, 16, 2
    base = layers * 2 * n * d * d
    lora_pass = layers * 3 * n * d * e  # a separate pass reads x and base_out and writes out
    steps = [
        Step("base Linears (cuBLAS)", base, layers * (2 * n * d * e + d * d * e)),
        Step("LoRA pass: read x and base_out, write out (few FLOPs)", layers * 4 * n * r * d, lora_pass),
    ]
    return [
        TargetModel(
            "multi_lora",
            "single-adapter fwd overhead over base <= 15%",
            None,
            base,
            layers * 2 * n * d * e,
            steps,
            ("shrink_expand fwd",),
            note=f"the separate LoRA pass alone costs {100 * steps[1].floor_ms / steps[0].floor_ms:.0f}% of the base "
            "layer at the ceilings: the 15% target needs the shrink folded into the base GEMM",
        )
    ]


def _bf16():
    import torch

    return torch.bfloat16


def all_models() -> list:
    """Every target with a model, in the benchmarks' order."""
    return masked_mean_models() + latent_attention_models() + infonce_models() + multi_lora_models()


def format_models(models: Optional[list] = None, resources: Optional[list] = None) -> str:
    """The model as text: per target its floor, the design's floor, what share of the ceilings it
    needs, each step; then the compiled kernels' resources when given (KernelResources dicts)."""
    models = all_models() if models is None else models
    lines = [
        f"performance model (H100 ceilings: {MATMUL_CEILING_TFLOPS:.0f} TFLOP/s bf16 matmul, "
        f"{COPY_CEILING_GBPS:.0f} GB/s copy; no GPU needed):"
    ]
    for m in models:
        needs = "" if m.needs is None else f", needs {100 * m.needs:.0f}% of the ceilings for the target"
        lines.append(
            f"  {m.op}: {m.target}: {m.flops / 1e12:.3f} TFLOP, {m.bytes / 1e9:.3f} GB; floor {m.floor_ms:.3f} ms, "
            f"design floor {m.design_floor_ms:.3f} ms{needs}"
        )
        for s in m.steps:
            lines.append(f"      {s.floor_ms:7.3f} ms  {s.bound:<7} {s.name}")
        if m.note:
            lines.append(f"      note: {m.note}")
    if resources:
        lines.append("compiled kernels (sm_90): registers / spills a thread, shared memory, blocks per SM, occupancy")
        for r in resources:
            lines.append(
                f"  {r['name']:<60} w{r['num_warps']} s{r['num_stages']}  regs {r['registers']:>3}  "
                f"spills {r['spill_stores']}/{r['spill_loads']} B  smem {r['shared_bytes'] / 1024:5.0f} KiB  "
                f"{r['blocks_per_sm']} blocks/SM  {100 * r['occupancy']:.0f}%"
            )
    return "\n".join(lines)
